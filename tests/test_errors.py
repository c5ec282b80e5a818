"""Every user mistake through the command line: one stderr line `kd-tune: <file or field>: ...`, exit code 2."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_config import billion_laughs
from test_data import HUGE_RATE_HZ, clean_folder, speakers_in, tone, wav_claiming_rate

from kd_tune.cli import main
from kd_tune.config import ConfigError, dump_config, load_config

EXIT_INVALID = 2


def write(path: Path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def bad_manifest(root: Path, line: str) -> str:
    good = json.dumps({"path": "positive/a.wav", "label": 1, "kind": "positive", "split": "train"})
    write(root / "manifest.jsonl", f"{good}\n{line}\n")
    return str(root)


def no_val_positives(root: Path) -> str:
    """A folder whose val split has negatives only."""
    clean_folder(root)
    for path in (root / "positive").glob(f"{speakers_in('val', 1)[0]}_*"):
        path.unlink()
    speaker = speakers_in("train", 1)[0]
    for kind in ("positive", "negative"):
        sf.write(root / kind / f"{speaker}_a.wav", tone(0.8, 16000), 16000)
    return str(root)


def at_root(root: Path, *settings: str, sweep_in: Path | None = None) -> list[str]:
    """--set arguments for a run whose data and storage root are `root`; sweep_in: a sweep experiment there first."""
    if sweep_in is not None:
        write(sweep_in / "sweep" / "leaderboard.json", "[]")
    return [arg for item in (f"data.root={root}", f"storage.root={root}", *settings) for arg in ("--set", item)]


def linked_out(root: Path) -> str:
    """A data set whose manifest lists out/x.wav, where out/ is a link to a folder outside the set."""
    (root / "elsewhere").mkdir()
    write(root / "elsewhere" / "x.wav", b"")
    (root / "set").mkdir()
    (root / "set" / "out").symlink_to(root / "elsewhere")
    return bad_manifest(root / "set", json.dumps({"path": "out/x.wav", "label": 1, "kind": "positive",
                                                  "split": "train"}))


# (case name, argv builder given tmp_path, text the one line must contain)
CASES = [
    ("billion laughs", lambda t: ["config", "check", write(t / "laughs.yaml", billion_laughs())], "laughs.yaml: line"),
    ("not utf-8", lambda t: ["config", "check", write(t / "latin.yaml", b"data:\n  wakeword: h\xe9\n")],
     "latin.yaml: not UTF-8"),
    ("missing config", lambda t: ["config", "check", str(t / "nowhere.yaml")], "nowhere.yaml: cannot read"),
    ("credentials", lambda t: ["config", "check", write(t / "s3.yaml", "storage:\n  root: s3://user:pw@bucket\n"),
                               "--no-path-check"], "s3.yaml: storage.root: credentials"),
    ("infinite lr", lambda t: ["config", "check", write(t / "inf.yaml", "training:\n  lr: .inf\n"),
                               "--no-path-check"], "inf.yaml: training.lr: Input should be a finite number"),
    ("1e29 epochs", lambda t: ["config", "check", write(t / "ep.yaml", f"training:\n  epochs: {10**29}\n"),
                               "--no-path-check"], "ep.yaml: training.epochs"),
    ("several problems", lambda t: ["config", "check", write(t / "two.yaml", "training:\n  epochs: 0\n  lr: -1\n"),
                                    "--no-path-check"], "two.yaml: 2 problems: training.epochs"),
    ("broken --set", lambda t: ["results", str(t), "--set", "training.epochs=["],
     "--set training.epochs: not valid YAML"),
    ("--set list index", lambda t: ["results", str(t), "--set", "teachers.5.name=x"],
     "--set teachers.5.name: teachers.5: not an entry"),
    ("--set under a value", lambda t: ["results", str(t), "--set", "data.root.x=1"],
     "--set data.root.x: data.root holds"),
    ("broken manifest line", lambda t: ["data", "check", bad_manifest(t, '{"path": ')],
     "manifest.jsonl:2: not JSON"),
    ("manifest path escape", lambda t: ["data", "check", bad_manifest(
        t, json.dumps({"path": "../x.wav", "label": 1, "kind": "positive", "split": "train"}))],
     "manifest.jsonl:2: path '../x.wav' leaves the data set"),
    ("missing data dir", lambda t: ["data", "check", str(t / "nowhere")], "nowhere: no such data directory"),
    ("no val positives", lambda t: ["teacher", "train", "--set", f"data.root={no_val_positives(t / 'd')}"],
     "positive: no usable positive clips in the val split"),
    ("synth seed", lambda t: ["data", "synth", "--out", str(t / "s"), "--seed", "-1"], "seed -1"),
    ("teacher --only unknown", lambda t: ["teacher", "train", "--only", "nosuch", "--set", f"data.root={t}"],
     "--only 'nosuch': not a configured teacher; allowed: cnn"),
    ("export --out a directory", lambda t: ["export", str(t / "nowhere"), "--out", str(t)], ": a directory; allowed"),
    ("export --out under a file", lambda t: ["export", str(t / "nowhere"), "--out", write(t / "f", "") + "/m.onnx"],
     "/f/m.onnx: its folder is a file; allowed"),
    ("query string in a URI", lambda t: ["export", "s3://bucket/exp?secret_key=s3cr3t", "--out", str(t / "m.onnx")],
     "EXPERIMENT: 's3://bucket/exp' carries user info, a query string"),
    ("teachers where experiments are", lambda t: ["teacher", "train", *at_root(t, f"storage.teachers={t}")],
     "is the same place as storage.root"),
    ("train --name the cache", lambda t: ["train", "--name", "cache", *at_root(t)], "/cache is the teacher cache"),
    ("train --name a sweep", lambda t: ["train", "--name", "sweep", *at_root(t, sweep_in=t)],
     "/sweep holds 'leaderboard.json', which `kd-tune train` does not write"),
    ("manifest path through a link", lambda t: ["data", "check", linked_out(t)],
     "manifest.jsonl:2: path 'out/x.wav' leaves the data set"),
    ("corrupt dataset.json", lambda t: ["data", "synth", "--out", str(Path(write(t / "s/dataset.json", "{")).parent)],
     "dataset.json: not valid JSON"),
]


@pytest.mark.parametrize("name,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_each_user_mistake_is_one_line_and_exit_2(tmp_path, capsys, name, argv, needle):
    # Rule: a user's mistake prints exactly one stderr line `kd-tune: <file or field>: <what is wrong>; <what is
    # allowed>`, names the file or field, exits 2, and shows no traceback.
    code = main(argv(tmp_path))
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == EXIT_INVALID, err
    assert len(lines) == 1 and lines[0].startswith("kd-tune: "), err
    assert needle in lines[0] and "Traceback" not in err and "BytesIO" not in err
    assert "allowed" in lines[0] or "expected" in lines[0] or "Input should" in lines[0], lines[0]
    assert len(lines[0]) < 1000


def test_the_credentials_never_reach_the_terminal(tmp_path, capsys):
    # Rule: secrets never live in configs, nor in the message that refuses them.
    path = write(tmp_path / "s3.yaml", "storage:\n  root: s3://AKIA1:s3cr3t@bucket\n")
    assert main(["config", "check", path, "--no-path-check"]) == EXIT_INVALID
    assert "s3cr3t" not in capsys.readouterr().err


def test_a_billion_laughs_config_check_exits_2_fast_and_short(tmp_path):
    # Rule: `kd-tune config check` of a 400-byte alias bomb exits 2 in seconds (the process, imports included) with
    # a short stderr; it printed 226 MB before.
    path = write(tmp_path / "laughs.yaml", billion_laughs())
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "kd_tune", "config", "check", path], capture_output=True, text=True,
                         timeout=60)
    assert time.perf_counter() - start < 15
    assert out.returncode == EXIT_INVALID and len(out.stderr) < 400 and len(out.stderr.splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path, capsys):
    # Rule: `--debug` (before the sub-command) re-raises a refusal, so its traceback shows.
    path = write(tmp_path / "inf.yaml", "training:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match="training.lr"):
        main(["--debug", "config", "check", path, "--no-path-check"])
    out = subprocess.run([sys.executable, "-m", "kd_tune", "--debug", "config", "check", path, "--no-path-check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_data_check_names_a_file_with_an_absurd_header(tmp_path, capsys):
    # Rule: `kd-tune data check` names the 444-byte WAV claiming 10,000,019 Hz with the real reason (exit 1: a
    # report of problems, not a refusal), and never prints a BytesIO in place of a file name.
    root = clean_folder(tmp_path)
    speaker = speakers_in("train", 1)[0]
    for kind in ("positive", "negative"):
        sf.write(root / kind / f"{speaker}_a.wav", tone(0.8, 16000), 16000)
    wav_claiming_rate(root / "negative" / "huge.wav", HUGE_RATE_HZ)
    (root / "negative" / "junk.wav").write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{root / 'negative' / 'huge.wav'}: bad sample rate ({HUGE_RATE_HZ} Hz; allowed: 8000-192000 Hz), " \
        "skipped when loading" in out
    assert f"{root / 'negative' / 'junk.wav'}: unreadable (" in out and "BytesIO" not in out


def test_secrets_in_a_source_uri_never_reach_the_terminal(tmp_path, capsys):
    # Rule: a query string or user info in an experiment URI is refused with the URI redacted, for every command
    # that takes one.
    for argv in (["export", "s3://bucket/exp?secret_key=s3cr3t", "--out", str(tmp_path / "m.onnx")],
                 ["results", "s3://AKIA1:s3cr3t@bucket/exp"], ["results", "s3://bucket/exp#s3cr3t"]):
        assert main(argv) == EXIT_INVALID
        err = capsys.readouterr().err
        assert "s3cr3t" not in err and "s3://bucket/exp" in err and len(err.splitlines()) == 1


def file_tree(root: Path) -> dict:
    """Every file under root with its bytes: what a refused command must leave as it was."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_no_command_removes_a_file_it_did_not_write(tmp_path, capsys):
    # Rule: with the teacher store on the experiments' root, a teacher named `sweep`, a run named `sweep` (also with
    # --overwrite or --resume) and a run named like the cache are each refused in one line, exit 2, and not one
    # file of the experiment `sweep` changes.
    for rel in ("leaderboard.json", "config.yaml", "trial_1_cnn_linear/train/checkpoint_000001/manifest.json"):
        write(tmp_path / "sweep" / rel, "{}")
    before = file_tree(tmp_path)
    teacher = "teachers=[{name: sweep, arch: cnn, source: tiny}]"
    for argv in (["teacher", "train", *at_root(tmp_path, f"storage.teachers={tmp_path}", teacher)],
                 ["teacher", "train", "--only", "sweep", *at_root(tmp_path, f"storage.teachers={tmp_path}", teacher)],
                 ["train", "--name", "sweep", *at_root(tmp_path)],
                 ["train", "--name", "sweep", "--overwrite", *at_root(tmp_path)],
                 ["train", "--name", "sweep", "--resume", *at_root(tmp_path)],
                 ["train", "--name", "sweep/trial_1_cnn_linear", "--overwrite", *at_root(tmp_path)]):
        assert main(argv) == EXIT_INVALID, argv
        assert len(capsys.readouterr().err.splitlines()) == 1
        assert file_tree(tmp_path) == before, argv


def test_a_run_of_another_config_is_kept_unless_overwritten(tmp_path):
    # Rule: `kd-tune train --name NAME` over a run of another config is refused unless --resume or --overwrite;
    # --overwrite deletes only what `kd-tune train` writes there (checkpoints and TensorBoard events), and only once
    # the run is sure to start.
    from kd_tune.record import RunExistsError, claim_run
    from kd_tune.storage import Storage

    config = load_config(None, overrides=[f"data.root={tmp_path}", f"storage.root={tmp_path}"])
    store = Storage.from_config(config.storage)
    for rel in ("run/config.yaml", "run/checkpoints/epoch_0001/manifest.json", "run/tensorboard/events"):
        write(tmp_path / rel, "other")
    with pytest.raises(RunExistsError, match="^--name run: .*/run is a run of another config; allowed: --resume"):
        claim_run(store, "run", config, resume=False, overwrite=False)
    assert claim_run(store, "run", config, resume=True, overwrite=False) == []
    assert claim_run(store, "run", config, resume=False, overwrite=True) == ["run/checkpoints", "run/tensorboard"]
    write(tmp_path / "run" / "config.yaml", dump_config(config))
    assert claim_run(store, "run", config, resume=False, overwrite=False) == []  # the same config: a rerun
