"""kd_tune.yamlfile: YAML read within size, depth and alias-expansion limits, each refusal one short line."""

import os
import time
from itertools import pairwise

import pytest

from kd_tune.errors import ConfigError
from kd_tune.yamlfile import MAX_YAML_BYTES, read_yaml


def billion_laughs(levels: int = 9) -> str:
    """The classic alias bomb: 9 aliases per level, 9^levels strings once expanded, ~400 bytes as text."""
    names = "abcdefghijklmnop"[:levels]
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]" for previous, name in pairwise(names)]
    return "\n".join(lines) + f"\ntraining:\n  epochs: *{names[-1]}\n"


def test_a_billion_laughs_config_is_refused_fast_and_short(tmp_path):
    # Rule: YAML aliases are counted as expanded before anything is built: a 400-byte alias bomb (10^9 values) is
    # refused in well under a second with a short message, never echoed (it printed 226 MB before).
    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs())
    assert len(path.read_bytes()) < 450
    start = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        read_yaml(path, source=str(path))
    assert time.perf_counter() - start < 1.0
    message = str(caught.value)
    assert message.startswith(f"{path}: line ") and "more than 10000 values" in message and len(message) < 300


@pytest.mark.parametrize("text,needle", [
    ("a: &a [*a]\n", "recursive or undefined alias"),
    ("x: " + "[" * 100 + "]" * 100 + "\n", "nested deeper than 16 levels"),
    ("x: " + "[" * 100_000 + "]" * 100_000 + "\n", "not valid YAML"),
    ("training:\n  epochs: [\n", "line 3, column 1: not valid YAML"),
    ("training:\n  epochs: " + "9" * 5000 + "\n", "not valid YAML (Exceeds the limit"),
    ("training: !!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),
])
def test_bad_yaml_is_one_short_line(tmp_path, text, needle):
    # Rule: recursive aliases, deep nesting, broken syntax, numbers Python cannot convert and object tags are each one
    # short ConfigError line naming the file (and the line where known).
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        read_yaml(path, source=str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and needle in message and "\n" not in message and len(message) < 400


def test_files_that_are_too_big_not_utf8_or_not_regular_are_refused(tmp_path):
    # Rule: a YAML file (a config, a search space) is read within MAX_YAML_BYTES, as UTF-8, from a regular file (a
    # FIFO would block forever).
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_YAML_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=r"big\.yaml: larger than 256 KiB"):
        read_yaml(big, source=str(big))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"data:\n  wakeword: h\xe9 nova\n")
    with pytest.raises(ConfigError, match=r"latin\.yaml: not UTF-8 text \(byte 0xe9 at offset 19\)"):
        read_yaml(latin, source=str(latin))
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"fifo\.yaml: not a regular file"):
        read_yaml(fifo, source=str(fifo))
