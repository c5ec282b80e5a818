"""kd_tune.signing: key settings, when a signature is required, HMAC verification, bounded strict JSON."""

import json
import logging
import os
import time

import pytest

from kd_tune import signing
from kd_tune.errors import InputError
from kd_tune.signing import (ENV_REQUIRE_SIGNATURE, ENV_SIGNING_KEY, ENV_SIGNING_KEY_FILE, SigningError, json_depth,
                             parse_json, signature_required, signed, signing_key, verify_signature)

KEY = "correct horse battery staple"


pytestmark = pytest.mark.usefixtures("no_signing_env")  # conftest: the environment's key never leaks in


def one_line_error(call, match: str) -> str:
    """The message of the SigningError `call` raises: one line, exit code 2, matching `match`."""
    with pytest.raises(SigningError, match=match) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and error.value.exit_code == 2 and isinstance(error.value, InputError)
    return message


# ---------------------------------------------------------------- key settings


def test_the_key_comes_from_the_variable_or_a_file(tmp_path, monkeypatch):
    # Rule: the key is KD_TUNE_SIGNING_KEY's value, or KD_TUNE_SIGNING_KEY_FILE's content without surrounding space.
    assert signing_key() is None
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    assert signing_key() == KEY.encode()
    monkeypatch.delenv(ENV_SIGNING_KEY)
    (tmp_path / "key").write_text(f"  {KEY}\n")
    monkeypatch.setenv(ENV_SIGNING_KEY_FILE, str(tmp_path / "key"))
    assert signing_key() == KEY.encode()


def test_an_empty_key_is_an_error_naming_the_variable(monkeypatch):
    # Rule: an empty KD_TUNE_SIGNING_KEY does not silently turn signing off: it is refused, naming the variable.
    monkeypatch.setenv(ENV_SIGNING_KEY, "")
    assert one_line_error(signing_key, "set but empty").startswith(f"{ENV_SIGNING_KEY}: ")


@pytest.mark.parametrize("content", [b"", b" \n\t"])
def test_an_empty_key_file_is_an_error(tmp_path, monkeypatch, content):
    # Rule: a key file holding nothing but whitespace is refused, naming the variable and the file.
    (tmp_path / "key").write_bytes(content)
    monkeypatch.setenv(ENV_SIGNING_KEY_FILE, str(tmp_path / "key"))
    assert str(tmp_path / "key") in one_line_error(signing_key, f"{ENV_SIGNING_KEY_FILE}=.*holds no key")


def test_a_missing_key_file_names_the_variable_and_the_path(tmp_path, monkeypatch):
    # Rule: a missing key file is a one-line refusal naming KD_TUNE_SIGNING_KEY_FILE and the path, not bare ENOENT.
    missing = tmp_path / "no" / "key"
    monkeypatch.setenv(ENV_SIGNING_KEY_FILE, str(missing))
    message = one_line_error(signing_key, "cannot read the key file")
    assert message.startswith(f"{ENV_SIGNING_KEY_FILE}='{missing}': ")


@pytest.mark.parametrize("kind", ["directory", "fifo", "huge"])
def test_a_key_file_that_is_no_key_is_refused_without_blocking(tmp_path, monkeypatch, kind):
    # Rule: a directory, a FIFO (whose open would block) or a huge file is refused at once, in bounded time.
    path = tmp_path / "key"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b"k" * (signing.MAX_KEY_FILE_BYTES + 1))
    monkeypatch.setenv(ENV_SIGNING_KEY_FILE, str(path))
    started = time.monotonic()
    one_line_error(signing_key, ENV_SIGNING_KEY_FILE)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("value", ["", " ", " \t\n"])
def test_a_whitespace_key_is_refused_from_the_variable_as_from_a_file(tmp_path, monkeypatch, value):
    # Rule: a key from KD_TUNE_SIGNING_KEY follows a key file's rules: whitespace alone is no key, and surrounding
    # whitespace is no part of one.
    monkeypatch.setenv(ENV_SIGNING_KEY, value)
    one_line_error(signing_key, f"^{ENV_SIGNING_KEY}: set but empty .empty or whitespace only")
    monkeypatch.setenv(ENV_SIGNING_KEY, f" {KEY}\n")
    assert signing_key() == KEY.encode()


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_key_file_others_can_write_is_refused(tmp_path, monkeypatch, mode):
    # Rule: a key file writable by group or others is refused: whoever can write the key can sign anything.
    path = tmp_path / "key"
    path.write_text(KEY)
    path.chmod(mode)
    monkeypatch.setenv(ENV_SIGNING_KEY_FILE, str(path))
    assert f"mode 0{mode:o}" in one_line_error(signing_key, f"^{ENV_SIGNING_KEY_FILE}=.*writable by group or others")
    path.chmod(0o600)
    assert signing_key() == KEY.encode()


def test_both_key_variables_set_is_an_error(tmp_path, monkeypatch):
    # Rule: an ambiguous key source is a one-line refusal naming both variables, never a guess.
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    monkeypatch.setenv(ENV_SIGNING_KEY_FILE, str(tmp_path / "key"))
    one_line_error(signing_key, f"{ENV_SIGNING_KEY} and {ENV_SIGNING_KEY_FILE}: both are set")


@pytest.mark.parametrize("value", ["yes", "true", "2", "x" * 10_000])
def test_require_signature_takes_only_0_or_1(monkeypatch, value):
    # Rule: KD_TUNE_REQUIRE_SIGNATURE is 0, 1 or unset; anything else is a short one-line refusal (long values cut).
    monkeypatch.setenv(ENV_REQUIRE_SIGNATURE, value)
    message = one_line_error(signature_required, f"{ENV_REQUIRE_SIGNATURE}=.*allowed: 1 .*0 .*unset")
    assert len(message) < 300


def test_a_key_makes_a_signature_required_unless_opted_out(monkeypatch):
    # Rule: without a key nothing is required; with a key a signature is required by default; 0 opts out, 1 opts in.
    assert signature_required() is False
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    assert signature_required() is True
    monkeypatch.setenv(ENV_REQUIRE_SIGNATURE, "0")
    assert signature_required() is False
    monkeypatch.delenv(ENV_SIGNING_KEY)
    monkeypatch.setenv(ENV_REQUIRE_SIGNATURE, "1")
    assert signature_required() is True
    assert signature_required(False) is False


# ---------------------------------------------------------------- signing and verifying


def test_a_signature_covers_every_field(monkeypatch):
    # Rule: the HMAC covers every field but itself: changing any value, adding or removing a field breaks it.
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    document = signed({"threshold": 0.5, "nested": {"a": [1, 2]}, "sha": "ab" * 32})
    verify_signature(document, "doc.json")
    for changed in ({**document, "threshold": 0.1}, {**document, "nested": {"a": [1, 3]}},
                    {**document, "extra": None}, {k: v for k, v in document.items() if k != "sha"}):
        with pytest.raises(SigningError, match="doc.json: signature does not match"):
            verify_signature(changed, "doc.json")


def test_a_stripped_signature_is_refused_when_a_key_is_set(monkeypatch, caplog):
    # Rule: with a key set a document without its signature is refused; KD_TUNE_REQUIRE_SIGNATURE=0 accepts it, and
    # says so in a warning naming the document.
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    stripped = {k: v for k, v in signed({"x": 1}).items() if k != "signature"}
    with pytest.raises(SigningError, match="doc.json: unsigned, but a signature is required .a signing key is set"):
        verify_signature(stripped, "doc.json")
    monkeypatch.setenv(ENV_REQUIRE_SIGNATURE, "0")
    with caplog.at_level(logging.WARNING, logger="kd_tune.signing"):
        verify_signature(stripped, "doc.json")
    assert [r.getMessage() for r in caplog.records] == [f"doc.json: unsigned, accepted only because "
                                                        f"{ENV_REQUIRE_SIGNATURE}=0"]


def test_signatures_present_are_checked_even_when_opted_out(monkeypatch):
    # Rule: the opt-out accepts unsigned documents only: a signature that is there must still match.
    monkeypatch.setenv(ENV_SIGNING_KEY, "another key")
    document = signed({"x": 1})
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    monkeypatch.setenv(ENV_REQUIRE_SIGNATURE, "0")
    with pytest.raises(SigningError, match="signature does not match"):
        verify_signature(document, "doc.json")


def test_without_a_key_required_signatures_are_refused(monkeypatch):
    # Rule: KD_TUNE_REQUIRE_SIGNATURE=1 without a key refuses unsigned and signed documents alike (nothing verifies).
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    document = signed({"x": 1})
    monkeypatch.delenv(ENV_SIGNING_KEY)
    monkeypatch.setenv(ENV_REQUIRE_SIGNATURE, "1")
    with pytest.raises(SigningError, match="unsigned, but a signature is required .KD_TUNE_REQUIRE_SIGNATURE=1"):
        verify_signature({"x": 1}, "doc.json")
    with pytest.raises(SigningError, match="signed, but no key is set"):
        verify_signature(document, "doc.json")


# ---------------------------------------------------------------- bounded strict JSON


@pytest.mark.parametrize("text, depth", [
    ('{"a": [1, 2, {"b": "[[[\\"[["}]}', 3),  # brackets and escaped quotes inside strings do not count
    ('["\\\\", [[]]]', 3),  # an escaped backslash ends before the closing quote
    ('"\\\\\\"["', 0),
    ("", 0),
    ("17", 0),
])
def test_json_depth_counts_only_structural_brackets(text, depth):
    # Rule: the depth check sees the nesting json.loads would recurse into, never brackets inside strings.
    assert json_depth(text.encode()) == depth
    if text:
        assert json.loads(text) is not None


def test_deep_json_is_refused_without_recursion():
    # Rule: JSON nested past MAX_JSON_DEPTH is a ValueError saying how deep, found in linear time (no RecursionError),
    # also for a megabyte of brackets; JSON at the limit parses.
    started = time.monotonic()
    with pytest.raises(ValueError, match=f"nested 100000 levels deep .allowed: at most {signing.MAX_JSON_DEPTH}"):
        parse_json(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ValueError, match="nested"):
        parse_json(b'{"a":' * 2**19)
    assert time.monotonic() - started < 5
    depth = signing.MAX_JSON_DEPTH
    assert parse_json(b"[" * depth + b"]" * depth) == json.loads("[" * depth + "]" * depth)


@pytest.mark.parametrize("text", [b"NaN", b"[Infinity]", b"\xff\xfe", b"{"])
def test_non_json_is_a_value_error(text):
    # Rule: NaN, Infinity, bytes that are not UTF-8 and broken JSON are ValueErrors (callers name the file).
    with pytest.raises(ValueError):
        parse_json(text)


@pytest.mark.parametrize("text", [b'{"threshold": 0.0, "threshold": 0.9}', b'[{"a": 1, "b": {"c": 2, "c": 2}}]'])
def test_a_key_twice_in_one_object_is_refused(text):
    # Rule: strict JSON has each key once per object, at any depth: Python keeps the last of two values, other
    # readers the first, so a signed document must not hold both.
    with pytest.raises(ValueError, match="key '(threshold|c)' appears more than once"):
        parse_json(text)
    assert parse_json(b'{"a": {"c": 1}, "b": {"c": 1}}') == {"a": {"c": 1}, "b": {"c": 1}}


def test_a_signed_card_with_a_duplicate_threshold_is_refused(tmp_path, monkeypatch):
    # Rule: a signed model card with a second "threshold" put in front is refused by the reader that detect and
    # eval use, not read with whichever value its parser keeps.
    from kd_tune.deploy.detect import DetectError, read_card

    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    card = json.dumps(signed({"threshold": 0.9, "format": "x"}))
    (tmp_path / "model.json").write_text('{"threshold": 0.0, ' + card[1:])
    with pytest.raises(DetectError, match="model.json: not valid JSON: key 'threshold' appears more than once"):
        read_card(tmp_path / "model.onnx")
