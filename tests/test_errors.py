"""Every user mistake through the command line: one stderr line `kd-tune: <file or field>: ...`, exit code 2."""

import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from kd_tune.tuning.sweep import free_port
from test_yamlfile import billion_laughs
from test_data import HUGE_RATE_HZ, clean_folder, complete_folder, speakers_in, wav_claiming_rate
from test_heldout import peak_model
from test_leaderboard import experiment as saved_experiment

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
    complete_folder(root)
    for path in (root / "positive").glob(f"{speakers_in('val', 1)[0]}_*"):
        path.unlink()
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


def experiment(root: Path, **files: str | int | None) -> str:
    """root/sweep as a sweep without trials leaves it (tests/evaluation/test_leaderboard.py), then `files` written
    over it: name -> text, a size (a sparse file), None (a folder in the file's place) or "<missing>"."""
    exp, _ = saved_experiment(root, [])
    for name, text in files.items():
        (exp / name).unlink()
        if text is None:
            (exp / name).mkdir(parents=True)
        elif isinstance(text, int):
            sparse(exp / name, text)
        elif text != "<missing>":
            write(exp / name, text)
    return str(exp)


def sparse(path: Path, size: int) -> str:
    """A file of `size` bytes that takes no disk: reading it costs what it claims, its size nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def model_with(root: Path, **card: object) -> str:
    """The hand-built peak model (tests/evaluation/test_heldout.py), its card changed by `card`, unsigned."""
    root.mkdir(parents=True, exist_ok=True)
    model = peak_model(root / "model.onnx")
    path = model.with_suffix(".json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **card}))
    return str(model)


def nested(base: Path, depth: int, *, remove: bool = False) -> None:
    """`depth` folders nested under base (or removed again), one at a time: os.makedirs and shutil.rmtree recurse."""
    for level in range(depth, 0, -1) if remove else range(1, depth + 1):
        (os.rmdir if remove else os.mkdir)(base / "/".join(["d"] * level))


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
    # --out where a folder goes, for every command that writes one, refused before the model or data is read
    ("eval --out a file", lambda t: ["eval", str(t / "m.onnx"), str(t), "--out", write(t / "f", "")],
     "/f: a file; allowed: a folder"),
    ("eval --out under a file", lambda t: ["eval", str(t / "m.onnx"), str(t), "--out", write(t / "f", "") + "/o"],
     "/f/o: its folder is a file; allowed"),
    ("eval --out holding a folder eval.json", lambda t: [
        "eval", str(t / "m.onnx"), str(t), "--out", str(Path(write(t / "o/eval.json/x", "")).parent.parent)],
     "/o/eval.json is a directory where a file is written; allowed"),
    ("compare --out a file", lambda t: ["compare", "--out", write(t / "f", ""), *at_root(t)],
     "/f: a file; allowed: a folder"),
    ("compare --out under a file", lambda t: ["compare", "--out", write(t / "f", "") + "/a/b", *at_root(t)],
     "/f/a/b: its folder is a file; allowed"),
    ("synth --out a file", lambda t: ["data", "synth", "--out", write(t / "f", "")], "/f: a file; allowed: a folder"),
    ("synth --out under a file", lambda t: ["data", "synth", "--out", write(t / "f", "") + "/s"],
     "/f/s: its folder is a file; allowed"),
    # storage roots and endpoints pyarrow cannot use: the field and what is allowed, not pyarrow's traceback
    ("storage.root s3:// without a bucket", lambda t: ["train", *at_root(t, "storage.root=s3://")],
     "storage.root: an s3:// URI without a bucket; allowed: a local path other than /, file:///path or s3://"),
    ("storage.root http://", lambda t: ["train", *at_root(t, "storage.root=http://example.com/runs")],
     "storage.root: scheme 'http' is not a storage; allowed"),
    ("storage.root /", lambda t: ["teacher", "train", *at_root(t, "storage.root=/")],
     "storage.root: the filesystem root; allowed"),
    ("an experiment in /", lambda t: ["results", "/sweep"], "EXPERIMENT: storage.root: the filesystem root; allowed"),
    ("ftp:// endpoint", lambda t: ["train", *at_root(t, "storage.root=s3://bucket/runs",
                                                     "storage.endpoint_override=ftp://127.0.0.1:21")],
     "storage.endpoint_override: not an S3 endpoint; allowed: http(s)://host[:port]"),
    # `kd-tune results` on what a sweep did not write
    ("truncated leaderboard", lambda t: ["results", experiment(t, **{"leaderboard.json": '[{"trial": "1", "st'})],
     "leaderboard.json: not valid JSON: Unterminated string"),
    ("deep leaderboard", lambda t: ["results", experiment(t, **{"leaderboard.json": "[" * 10**5 + "]" * 10**5})],
     "leaderboard.json: not valid JSON: nested 100000 levels deep"),
    ("all-strings leaderboard", lambda t: ["results", experiment(t, **{"leaderboard.json": '["a", "b"]'})],
     "leaderboard.json: not a list of rows (['a', 'b']); allowed"),
    ("1 GB sparse leaderboard", lambda t: ["results", experiment(t, **{"leaderboard.json": 2**30})],
     f"leaderboard.json: larger than {64 * 2**20} bytes ({2**30}); allowed"),
    ("invalid search_space.yaml", lambda t: ["results", experiment(t, **{"search_space.yaml": "teacher: 5\n"})],
     "sweep/search_space.yaml: 4 problems: teacher: Input should be a valid dictionary"),
    ("deep search_space.yaml", lambda t: ["results", experiment(t, **{"search_space.yaml": "a:\n" + "".join(
        " " * i + "b:\n" for i in range(1, 40))})], "search_space.yaml: line 17: nested deeper than 16 levels"),
    ("missing search_space.yaml", lambda t: ["results", experiment(t, **{"search_space.yaml": "<missing>"})],
     "search_space.yaml: missing; allowed"),
    ("config.yaml a directory", lambda t: ["results", experiment(t, **{"config.yaml": None})],
     "sweep/config.yaml: not a regular file (a directory); allowed"),
    ("broken config.yaml", lambda t: ["results", experiment(t, **{"config.yaml": "training: [\n"})],
     "sweep/config.yaml: not valid YAML"),
    # a teacher whose source loads nothing: a missing directory (a hub id offline says the same, in
    # tests/training/test_models.py)
    ("teacher source not a directory", lambda t: ["teacher", "train", *at_root(
        complete_folder(t), "teachers=[{name: h, arch: hubert, source: /no/such/dir}]", "distillation.teachers=[h]")],
     "could not load teacher source '/no/such/dir': no such directory; allowed: tiny, base"),
    # minor ones
    ("compare --teachers nosuch", lambda t: ["compare", "--teachers", "cnn", "nosuch", "--out", str(t / "c"),
                                             *at_root(t)],
     "--teachers (KD nosuch): <root>: distillation.teachers: ['nosuch'] are not configured teachers (allowed"),
    ("an 8 kHz card", lambda t: ["detect", model_with(t, sample_rate=8000), str(t / "a.wav")],
     "model.json: sample_rate: Value error, 8000 Hz, but the model's front end runs at 16000 Hz; allowed"),
    ("a 1 ms hop", lambda t: ["eval", model_with(t, hop_samples=16), str(t)],
     "model.json: card: Value error, hop_samples 16 is outside 160 (10 ms)"),
    ("2 GB sparse .onnx", lambda t: ["detect", sparse(Path(model_with(t)), 2**31), str(t / "a.wav")],
     f"model.onnx: {2**31} bytes; allowed: at most {64 * 2**20} bytes"),
]


@pytest.mark.parametrize("name,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_each_user_mistake_is_one_line_and_exit_2(tmp_path, capsys, name, argv, needle):
    # Rule: a user's mistake prints exactly one stderr line `kd-tune: <file or field>: <what is wrong>; <what is
    # allowed>`, names the file or field, exits 2, and shows no traceback: among them every command's --out that
    # cannot be written and every storage root pyarrow cannot use (found before any work), a broken experiment
    # under `results`, a file too large to read whole (found from its size), and folders 1,500 levels deep.
    code = main(argv(tmp_path))
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == EXIT_INVALID, err
    assert len(lines) == 1 and lines[0].startswith("kd-tune: "), err
    assert needle in lines[0] and "Traceback" not in err and "BytesIO" not in err
    assert "allowed" in lines[0] or "expected" in lines[0] or "Input should" in lines[0], lines[0]
    assert len(lines[0]) < 1000


def test_folders_1500_levels_deep_are_one_line_not_a_recursion_error(tmp_path, capsys):
    # Rule: `data check` and `eval` walk folders without recursion and refuse a tree deeper than
    # kd_tune.audio.io.MAX_FOLDER_DEPTH in one line, exit 2 (rglob hit Python's recursion limit at 1,500 levels).
    data = tmp_path / "set"
    (data / "positive").mkdir(parents=True)
    (data / "negative").mkdir()
    nested(data / "negative", 1500)
    try:
        for argv in (["data", "check", str(data)], ["eval", model_with(tmp_path), str(data)]):
            assert main(argv) == EXIT_INVALID, argv
            err = capsys.readouterr().err
            assert err == f"kd-tune: {data / 'negative'}: folders nested deeper than 32 levels; allowed: at most 32 " \
                "levels of folders in a data set\n"
    finally:
        nested(data / "negative", 1500, remove=True)  # pytest's own cleanup would recurse


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
    root = complete_folder(tmp_path)
    wav_claiming_rate(root / "negative" / "huge.wav", HUGE_RATE_HZ)
    (root / "negative" / "junk.wav").write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{root / 'negative' / 'huge.wav'}: bad sample rate ({HUGE_RATE_HZ} Hz; allowed: 8000 to 192000 Hz), " \
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
    from kd_tune.store.storage import Storage
    from kd_tune.training.record import RunExistsError, claim_run

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


def test_an_unreachable_s3_endpoint_is_one_line_in_bounded_time(tmp_path, capsys, monkeypatch):
    # Rule: an S3 store that does not answer is one line naming storage.root and what is allowed, exit 2, within
    # seconds (pyarrow's OSError used to end in a traceback), for the commands that read and write storage.
    for name, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    endpoint = f"storage.endpoint_override=http://127.0.0.1:{free_port()}"  # nothing listens there
    for argv in (["results", "s3://bucket/runs/sweep", "--set", endpoint],
                 ["train", *at_root(tmp_path, "storage.root=s3://bucket/runs", endpoint)]):
        started = time.monotonic()
        assert main(argv) == EXIT_INVALID, argv
        lines = capsys.readouterr().err.splitlines()
        assert time.monotonic() - started < 60
        assert len(lines) == 1 and lines[0].startswith("kd-tune: storage.root: the S3 store failed (") and \
            "; allowed: an S3 store that answers at storage.endpoint_override" in lines[0], lines


def test_special_files_in_class_and_long_folders_are_skipped_and_counted(tmp_path):
    # Rule: a FIFO or device named like a clip in a class folder or long/ is never opened: `data check` lists it as
    # unreadable (skipped when loading), `eval` skips and counts it, and `detect` refuses it in one line; `eval` and
    # `detect` used to block forever on a FIFO, and `data check` left it out without a word.
    data = complete_folder(tmp_path / "set")
    (data / "long").mkdir()
    for fifo in (data / "negative" / "fifo.wav", data / "long" / "fifo.wav"):
        os.mkfifo(fifo)
    (data / "negative" / "zero.wav").symlink_to("/dev/zero")
    model = peak_model(tmp_path / "model.onnx")

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kd_tune", *argv], capture_output=True, text=True, timeout=120)

    checked = run("data", "check", str(data)).stdout
    assert f"{data / 'negative' / 'fifo.wav'}: unreadable (not a regular file (a FIFO)), skipped" in checked
    assert f"{data / 'negative' / 'zero.wav'}: unreadable (not a regular file (a device)), skipped" in checked
    evaluated = run("eval", str(model), str(data), "--out", str(tmp_path / "out"))
    assert evaluated.returncode == 0 and "skipped 3 FIFOs, devices or sockets" in evaluated.stdout, evaluated.stderr
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["skipped_special_files"] == 3
    detected = run("detect", str(model), str(data / "long" / "fifo.wav"))
    assert detected.returncode == EXIT_INVALID
    assert detected.stderr == f"kd-tune: {data / 'long' / 'fifo.wav'}: not a regular file (a FIFO); allowed: an " \
        "audio file\n"


def test_control_characters_in_names_never_reach_the_terminal(tmp_path, capsys):
    # Rule: escape sequences in file names or in an experiment's leaderboard are printed escaped (`\x1b`), in reports
    # and refusals alike: a name cannot recolour, clear or retitle the terminal. A leaderboard row of strings where
    # numbers belong is printed, not a TypeError.
    data = clean_folder(tmp_path / "set")
    write(data / "negative" / "red\x1b[31m.txt", "x")
    main(["data", "check", str(data)])
    assert "red\\x1b[31m.txt: not audio" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "no\x1b]0;pwned\x07where")]) == EXIT_INVALID
    assert "no\\x1b]0;pwned\\x07where: no such data directory" in capsys.readouterr().err
    row = {"trial": "1\x1b[2J", "status": "OK", "teacher": "cnn\x1b[31m", "epochs": "x", "frr_conditions": "low"}
    assert main(["results", experiment(tmp_path, **{"leaderboard.json": json.dumps([row])})]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "cnn\\x1b[31m" in out


def test_huge_files_are_refused_from_their_size_unread(tmp_path, capsys):
    # Rule: a leaderboard, manifest, dataset.json or .onnx far past its cap (sparse here) is refused in one line from
    # its size on record, before any of it is read: a 1 GB leaderboard cost 2.8 GB, a 2 GB .onnx 2.2 GB, and a 1 GB
    # manifest.jsonl 64 MiB.
    cases = [["results", experiment(tmp_path, **{"leaderboard.json": 2**30})],
             ["data", "check", str(Path(sparse(tmp_path / "set" / "manifest.jsonl", 2**30)).parent)],
             ["data", "synth", "--out", str(Path(sparse(tmp_path / "syn" / "dataset.json", 2**30)).parent)],
             ["detect", sparse(Path(model_with(tmp_path / "m")), 2**31), str(tmp_path / "a.wav")]]
    for argv in cases:
        main(argv)  # the command's modules imported, so that only the refusal is measured
        capsys.readouterr()
        tracemalloc.start()
        try:
            assert main(argv) == EXIT_INVALID, argv
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "allowed" in err and peak < 8 * 2**20, (argv, peak, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_cuda_without_a_cuda_device_is_one_line(tmp_path, capsys):
    # Rule: `training.device: cuda` on a machine without CUDA is the config's mistake: one line, exit 2, no traceback.
    code = main(["teacher", "train", *at_root(complete_folder(tmp_path), "training.device=cuda")])
    err = capsys.readouterr().err
    assert code == EXIT_INVALID and err == ("kd-tune: training.device: 'cuda', but no CUDA device is available; "
                                            "allowed: auto, cpu\n"), err
