"""The signing key, HMAC-SHA256 signatures and bounded strict JSON for the documents kd_tune signs: checkpoint
manifests (store.checkpoint) and model cards (deploy.export, deploy.detect). Torch-free and pyarrow-free, so
that a model card verifies where only onnxruntime is installed.

A signature is an HMAC-SHA256 over the canonical JSON of the whole document except its `signature` field.

Environment:
    KD_TUNE_SIGNING_KEY        the HMAC key itself
    KD_TUNE_SIGNING_KEY_FILE   or a file holding it, writable by its owner only; set at most one of the two. Either
                               way surrounding whitespace is stripped and an empty key is refused
    KD_TUNE_REQUIRE_SIGNATURE  unset: a valid signature is required exactly when a key is set;
                               1: always required (without a key nothing verifies, so everything is refused);
                               0: not required (explicit opt-out, logged); signatures present are still checked
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat
from typing import Any, BinaryIO

import numpy as np

from kd_tune.errors import InputError, KdTuneError, shown

ALG = "HMAC-SHA256"
ENV_SIGNING_KEY = "KD_TUNE_SIGNING_KEY"
ENV_SIGNING_KEY_FILE = "KD_TUNE_SIGNING_KEY_FILE"
ENV_REQUIRE_SIGNATURE = "KD_TUNE_REQUIRE_SIGNATURE"
MAX_KEY_FILE_BYTES = 64 * 1024  # a key is tens of bytes: this only stops a wrong, huge or endless file (/dev/zero)
# kd_tune's own documents nest at most ~6 levels (config section -> list -> dict); 64 leaves room for anything
# reasonable and keeps every recursive walk (json, canonical_json, pydantic) far from Python's recursion limit.
MAX_JSON_DEPTH = 64
_OPEN, _CLOSE, _QUOTE, _BACKSLASH = (ord("["), ord("{")), (ord("]"), ord("}")), ord('"'), ord("\\")

log = logging.getLogger(__name__)


class SigningError(InputError):
    """A signing setting that is malformed, ambiguous or points at an unusable key."""


class SpecialFileError(InputError):
    """A FIFO, device, socket or directory where a file to read belongs."""

    def __init__(self, path: str | os.PathLike, kind: str, allowed: str = "a regular file"):
        self.path, self.kind = os.fspath(path), kind
        super().__init__(f"{self.path}: not a regular file ({kind}); allowed: {allowed}")


def special_kind(mode: int) -> str | None:
    """What a file of this st_mode is when it is not a regular file (None when it is)."""
    for test, kind in ((stat.S_ISREG, None), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return kind
    return "a special file"


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for reading once one os.stat shows a regular file; SpecialFileError without opening otherwise.

    Opening a FIFO without a writer blocks forever and a device may never end; the stat refuses both before any
    open, and O_NONBLOCK with an fstat of the open file closes the race of a file swapped in between.
    """
    kind = special_kind(os.stat(path).st_mode)
    if kind is not None:
        raise SpecialFileError(path, kind)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    kind = special_kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise SpecialFileError(path, kind)
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes | None:
    """The one bounded read of a local file: a regular file's bytes (open_regular), None past max_bytes. The size on
    record refuses a 1 GB sparse file before a byte is read; reading one byte past the limit, a file that grew."""
    with open_regular(path) as f:
        data = f.read(max_bytes + 1) if os.fstat(f.fileno()).st_size <= max_bytes else None
    return None if data is None or len(data) > max_bytes else data


# ---------------------------------------------------------------- settings


def signing_key() -> bytes | None:
    """The HMAC key from KD_TUNE_SIGNING_KEY, or from the file named by KD_TUNE_SIGNING_KEY_FILE; None if unset."""
    key, key_file = os.environ.get(ENV_SIGNING_KEY), os.environ.get(ENV_SIGNING_KEY_FILE)
    if key is not None and key_file is not None:
        raise SigningError(f"{ENV_SIGNING_KEY} and {ENV_SIGNING_KEY_FILE}: both are set; allowed: at most one")
    if key_file is not None:
        where = f"{ENV_SIGNING_KEY_FILE}={key_file!r}" if key_file else ENV_SIGNING_KEY_FILE
        return _checked_key(_read_key_file(key_file, where), where, "the file holds no key")
    if key is None:
        return None
    # An empty value must not silently turn signing off; a key is read the same from either source.
    return _checked_key(key.encode(), ENV_SIGNING_KEY, "set but empty")


def _checked_key(secret: bytes, where: str, empty: str) -> bytes:
    """The key without surrounding whitespace (an editor's newline is no part of it); nothing left is refused."""
    if not secret.strip():
        raise SigningError(f"{where}: {empty} (empty or whitespace only); allowed: a non-empty key, or unset the "
                           "variable to work without signatures")
    return secret.strip()


def _read_key_file(path: str, where: str) -> bytes:
    try:
        with open_regular(path) as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & (stat.S_IWGRP | stat.S_IWOTH):  # whoever can write the key can sign anything
                raise SigningError(f"{where}: writable by group or others (mode {stat.S_IMODE(mode):04o}); allowed: "
                                   "a key file only its owner can write (chmod 600)")
            secret = f.read(MAX_KEY_FILE_BYTES + 1)
    except SpecialFileError as error:
        raise SigningError(f"{where}: not a regular file ({error.kind}); allowed: a file holding the key") from None
    except OSError as error:
        raise SigningError(f"{where}: cannot read the key file ({error.strerror or error}); allowed: a readable "
                           "file holding the key") from None
    if len(secret) > MAX_KEY_FILE_BYTES:
        raise SigningError(f"{where}: larger than {MAX_KEY_FILE_BYTES} bytes; allowed: a file holding only the key")
    return secret


def signature_required(override: bool | None = None) -> bool:
    """Whether unsigned documents are refused: `override` if given, else KD_TUNE_REQUIRE_SIGNATURE, else key set."""
    if override is not None:
        return bool(override)
    value = os.environ.get(ENV_REQUIRE_SIGNATURE, "")
    if value not in ("", "0", "1"):
        shown = value if len(value) <= 20 else value[:17] + "..."
        raise SigningError(f"{ENV_REQUIRE_SIGNATURE}={shown!r}: not a setting; allowed: 1 (require a signature), "
                           "0 (do not), or unset (required when a signing key is set)")
    return value == "1" if value else signing_key() is not None


# ---------------------------------------------------------------- signing and verifying


def canonical_json(obj: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def signature_of(key: bytes, document: dict) -> str:
    unsigned = {k: v for k, v in document.items() if k != "signature"}
    return hmac.new(key, canonical_json(unsigned), hashlib.sha256).hexdigest()


def signed(document: dict) -> dict:
    """`document` with a `signature` field when a key is set; unchanged (and unsigned) otherwise."""
    key = signing_key()
    if key is None:
        return document
    return {**document, "signature": {"alg": ALG, "value": signature_of(key, document)}}


def verify_signature(document: dict, where: str, *, require: bool | None = None,
                     error: type[KdTuneError] = SigningError) -> None:
    """Check `document`'s signature against the key and KD_TUNE_REQUIRE_SIGNATURE; raise `error` naming `where`.

    `require` overrides the environment (True: refuse unsigned). Without a key a signature cannot be checked: it is
    accepted unless one is required.
    """
    key, required = signing_key(), signature_required(require)
    signature = document.get("signature")
    if signature is None:
        if required:
            raise error(f"{where}: unsigned, but a signature is required ({_why_required(require)}); allowed: "
                        f"a file signed with the key ({ENV_REQUIRE_SIGNATURE}=0 accepts unsigned files)")
        if key is not None:
            log.warning("%s: unsigned, accepted only because %s=0", where, ENV_REQUIRE_SIGNATURE)
        return
    if key is None:
        if required:
            raise error(f"{where}: signed, but no key is set to verify it; allowed: set {ENV_SIGNING_KEY} or "
                        f"{ENV_SIGNING_KEY_FILE}")
        return
    value = signature.get("value") if isinstance(signature, dict) else None
    if not isinstance(value, str) or not value.isascii() or signature.get("alg") != ALG:
        raise error(f"{where}: malformed signature; allowed: {{\"alg\": \"{ALG}\", \"value\": hex digest}}")
    if not hmac.compare_digest(signature_of(key, document), value):
        raise error(f"{where}: signature does not match: the file was altered or signed with another key; "
                    "allowed: files as kd_tune signed them with this key")


def _why_required(require: bool | None) -> str:
    if require is not None:
        return "require_signature=True"
    return f"{ENV_REQUIRE_SIGNATURE}=1" if os.environ.get(ENV_REQUIRE_SIGNATURE) == "1" else "a signing key is set"


# ---------------------------------------------------------------- bounded strict JSON


def json_depth(data: bytes) -> int:
    """How deep brackets nest in JSON text `data`, brackets inside strings not counted; O(len(data)), no recursion.

    Works on bytes: UTF-8 never puts an ASCII byte inside a multi-byte character.
    """
    codes = np.frombuffer(data, np.uint8)
    if codes.size == 0:
        return 0
    index = np.arange(codes.size)
    backslash = codes == _BACKSLASH
    run = index - np.maximum.accumulate(np.where(backslash, -1, index))  # backslashes ending at each byte
    escaped = np.concatenate(([False], run[:-1] % 2 == 1))  # a byte after an odd run of backslashes
    outside = np.cumsum((codes == _QUOTE) & ~escaped) % 2 == 0
    step = np.isin(codes, _OPEN).astype(np.int8) - np.isin(codes, _CLOSE)
    return int(np.cumsum(np.where(outside, step, 0), dtype=np.int64).max(initial=0))


def parse_json(data: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON (no NaN or Infinity) nested at most max_depth deep; ValueError says what is wrong."""
    depth = json_depth(data)
    if depth > max_depth:
        raise ValueError(f"nested {depth} levels deep (allowed: at most {max_depth})")
    # UnicodeDecodeError and JSONDecodeError are ValueErrors too
    return json.loads(data, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    # A signature covers the parsed document: with a key twice, Python keeps the last value and another reader the
    # first, so a signed file could mean one thing here and another elsewhere.
    document: dict = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"key {shown(key)} appears more than once (allowed: each key once per object)")
        document[key] = value
    return document
