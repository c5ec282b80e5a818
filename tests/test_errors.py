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
from kd_tune.config import ConfigError

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
