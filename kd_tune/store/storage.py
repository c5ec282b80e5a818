"""Confined storage roots on pyarrow filesystems: local or NFS paths and s3:// prefixes.

Every path a `Storage` hands out stays under its root: `..`, absolute and NUL paths are refused, and local paths are
opened component by component with O_NOFOLLOW, so a symlink cannot lead outside. Writes are atomic. The checkpoint
format built on top of this lives in kd_tune.store.checkpoint.

Environment: AWS_ENDPOINT_URL, AWS_DEFAULT_REGION and the usual AWS credential variables/files for s3:// roots.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import SplitResult, urlsplit

import pyarrow.fs as pafs

from kd_tune.errors import InputError, KdTuneError
from kd_tune.signing import SpecialFileError, parse_json, special_kind
from kd_tune.uris import endpoint_problem

DEFAULT_REGION = "us-east-1"
PUBLISHED_MODE = 0o644  # mkstemp/mkdtemp make 0600/0700: other users of a shared NFS root could not read results
PUBLISHED_DIR_MODE = 0o755
FIRST_CHUNK_BYTES, READ_CHUNK_BYTES = 2**16, 16 * 2**20  # bounded reads: the first and the largest step
# The largest JSON kd_tune reads whole is a leaderboard: ~1 KB a trial, so 64 MiB holds tens of thousands of trials.
MAX_JSON_BYTES = 64 * 2**20
CACHE_DIR = "cache"  # the teacher cache's folder under storage.root (kd_tune.training.cache.CACHE_ROOT)


class PathEscapeError(KdTuneError, ValueError):
    """A path that would leave its storage root."""


class StorageLayoutError(InputError):
    """Storage roots or names that overlap, so that writing one could replace another's files."""


class TooLargeError(InputError):
    """A file to read whole that is larger than its cap, found from its metadata before anything is read."""

    def __init__(self, where: str, size: int, max_bytes: int):
        self.size, self.max_bytes = size, max_bytes
        super().__init__(f"{where}: larger than {max_bytes} bytes ({size}); allowed: at most {max_bytes}")


# ---------------------------------------------------------------- storage roots


class Storage:
    """One root directory on a pyarrow filesystem; every path it hands out stays under that root."""

    def __init__(self, filesystem: pafs.FileSystem, root: str, *, uri: str | None = None):
        if not isinstance(filesystem, pafs.FileSystem):
            raise TypeError(f"filesystem must be a pyarrow.fs.FileSystem, got {type(filesystem).__name__}")
        if not isinstance(root, str) or not root.strip("/"):
            raise ValueError(f"storage root must be a non-empty path other than '/', got {root!r}")
        self.filesystem = filesystem
        self.is_local = isinstance(filesystem, pafs.LocalFileSystem)
        # A local root is resolved once so that confinement compares real paths on both sides.
        self.root = os.path.realpath(root) if self.is_local else root.strip("/")
        self.uri = uri or self.root

    @classmethod
    def from_uri(cls, uri: str | os.PathLike, *, endpoint_override: str | None = None,
                 region: str | None = None) -> Storage:
        """A local or NFS directory (a plain path or file://) or s3://bucket/prefix.

        S3 credentials come only from the environment or the standard AWS files: explicit keys would be pickled by
        Ray into tuner.pkl inside the bucket.
        """
        text = os.fspath(uri)
        if "://" not in text:
            return cls(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text)))
        parts = urlsplit(text)
        if parts.scheme == "file" and parts.netloc in ("", "localhost"):
            return cls(pafs.LocalFileSystem(), parts.path)
        if parts.scheme == "s3":
            return _s3_storage(parts, endpoint_override=endpoint_override, region=region)
        raise ValueError(f"storage URI scheme {parts.scheme!r} is not supported "
                         "(allowed: a local path, file:///path, s3://bucket/prefix)")

    @classmethod
    def from_config(cls, config: Any) -> Storage:
        """From a config section with `root`, `endpoint_override` and `region` (kd_tune.config.StorageConfig)."""
        return cls.from_uri(config.root, endpoint_override=config.endpoint_override, region=config.region)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def path(self, *parts: str | os.PathLike) -> str:
        """The filesystem path of `parts` joined under the root; raises PathEscapeError for anything leaving it."""
        components = [c for part in parts for c in _components(part, self.root)]
        candidate = posixpath.join(self.root, *components)
        # realpath follows every link that exists, dangling ones included, so a link out of the root shows up here.
        resolved = os.path.realpath(candidate) if self.is_local else candidate
        if not _is_within(resolved, self.root):
            raise PathEscapeError(f"path {posixpath.join(*(os.fspath(p) for p in parts))!r} resolves to {resolved!r}, "
                                  f"outside the storage root {self.root!r}")
        return candidate

    def local_path(self, *parts: str | os.PathLike) -> str:
        """path() on a local root, for libraries that write files themselves (TensorBoard, Ray)."""
        if not self.is_local:
            raise ValueError(f"storage {self.uri} is not a local directory: write through Storage instead")
        return self.path(*parts)

    def open_input(self, rel: str) -> BinaryIO:
        """A binary file object to read `rel`; locally no symlink below the root is followed."""
        path = self.path(rel)
        if not self.is_local:
            return self.filesystem.open_input_stream(path, compression=None)
        fd = _open_nofollow(self.root, rel, regular=True)
        try:
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def read_bytes(self, rel: str) -> bytes:
        with self.open_input(rel) as f:
            return f.read()

    def read_head(self, rel: str, max_bytes: int) -> bytes:
        """The first max_bytes bytes of `rel` (all of it when shorter), read in chunks: memory follows the file,
        not max_bytes, so a size promised by untrusted data allocates nothing up front."""
        chunks, left, step = [], max_bytes, FIRST_CHUNK_BYTES
        with self.open_input(rel) as f:
            while left > 0:
                chunk = f.read(min(left, step))  # read(n) allocates n up front: small first, doubling
                if not chunk:
                    break
                chunks.append(chunk)
                left, step = left - len(chunk), min(2 * step, READ_CHUNK_BYTES)
        return b"".join(chunks)

    def read_within(self, rel: str, max_bytes: int) -> bytes:
        """All of file `rel`, TooLargeError past max_bytes. The size on record is checked first, so a huge (or
        sparse) file is refused before any of it is read; the read stays capped for a file that grows meanwhile."""
        info = self.filesystem.get_file_info(self.path(rel))
        where = f"{self.uri.rstrip('/')}/{rel}"
        if info.type == pafs.FileType.File and info.size is not None and info.size > max_bytes:
            raise TooLargeError(where, info.size, max_bytes)
        data = self.read_head(rel, max_bytes + 1)
        if len(data) > max_bytes:
            raise TooLargeError(where, len(data), max_bytes)
        return data

    def size(self, rel: str) -> int:
        """The size of file `rel` in bytes, from the filesystem's metadata (nothing is read)."""
        info = self.filesystem.get_file_info(self.path(rel))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self.uri.rstrip('/')}/{rel} is not a file")
        return info.size

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file atomically: readers see the old content or the new one, never a part."""
        path = self.path(rel)
        if not self.is_local:
            with self.filesystem.open_output_stream(path, compression=None) as f:  # an S3 object appears whole
                f.write(data)
            return
        parent, name = posixpath.split(path)
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, PUBLISHED_MODE)
            os.replace(tmp, path)
        except BaseException:
            remove_local(tmp)
            raise

    def exists(self, rel: str) -> bool:
        return self.filesystem.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def listdir(self, rel: str = ".") -> list[str]:
        """Sorted names in directory `rel`; FileNotFoundError when it is missing."""
        path = self.path(rel)
        if not self.is_local:
            return sorted(info.base_name for info in self.filesystem.get_file_info(pafs.FileSelector(path)))
        fd = _open_nofollow(self.root, rel)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def makedirs(self, rel: str) -> None:
        self.filesystem.create_dir(self.path(rel), recursive=True)

    def delete_dir(self, rel: str) -> None:
        """Delete directory `rel` and everything in it; the root itself is refused."""
        path = self.path(rel)
        if path == self.root:
            raise PathEscapeError(f"refusing to delete the storage root {self.uri}")
        if self.is_local:
            shutil.rmtree(path)  # rmtree removes links inside the tree without following them
        else:
            self.filesystem.delete_dir(path)


def redact_uri(uri: str) -> str:
    """A URI as messages may show it: without user info, query string or fragment, where keys could hide."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def check_plain_uri(uri: str, where: str) -> None:
    """Refuse a URI carrying user info, a query string or a fragment, showing it redacted."""
    parts = urlsplit(uri) if "://" in uri else None
    if parts is not None and (parts.query or parts.fragment or "@" in parts.netloc):
        raise InputError(f"{where}: {redact_uri(uri)!r} carries user info, a query string or a fragment (not shown); "
                         "allowed: PATH or scheme://bucket/path, with credentials from the environment or ~/.aws")


def _s3_storage(parts: SplitResult, *, endpoint_override: str | None, region: str | None) -> Storage:
    bucket = parts.netloc.rpartition("@")[2]
    shown = redact_uri(parts.geturl())  # never echo user info or query strings: they may hold keys
    if parts.query or parts.fragment or "@" in parts.netloc or not bucket:
        raise ValueError(f"storage URI {shown!r} must be s3://bucket/prefix and nothing more: credentials come from "
                         "the environment or ~/.aws, the endpoint and region from endpoint_override/region or "
                         "AWS_ENDPOINT_URL/AWS_DEFAULT_REGION")
    root = posixpath.join(bucket, *_components(parts.path.strip("/") or ".", shown))
    return Storage(_s3_filesystem(endpoint_override, region), root, uri=f"s3://{root}")


def _s3_filesystem(endpoint_override: str | None, region: str | None) -> pafs.S3FileSystem:
    source = "endpoint_override" if endpoint_override else "AWS_ENDPOINT_URL"
    endpoint = endpoint_override or os.environ.get("AWS_ENDPOINT_URL")
    region = region or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    if not endpoint:
        return pafs.S3FileSystem(region=region)
    problem = endpoint_problem(endpoint)
    if problem:  # the variable escapes the config's check
        raise InputError(f"{source}: {redact_uri(endpoint)!r}: {problem}")
    url = urlsplit(endpoint)
    return pafs.S3FileSystem(endpoint_override=url.netloc, scheme=url.scheme, region=region)


def _components(rel: str | os.PathLike, root: str) -> list[str]:
    """The components of a relative path, '.' dropped; refuses anything that could climb out of `root`."""
    text = os.fspath(rel)
    if not isinstance(text, str) or not text or "\0" in text or text.startswith("/"):
        raise PathEscapeError(f"path {text!r} must be a non-empty relative path without NUL under root {root!r}")
    bad = [c for c in text.split("/") if c in ("", "..")]
    if bad:
        raise PathEscapeError(f"path {text!r} has a {bad[0]!r} component (not allowed under root {root!r})")
    return [c for c in text.split("/") if c != "."]


def _is_within(path: str, root: str) -> bool:
    # By components: a string prefix test would let root_evil pass for root.
    return posixpath.commonpath([root, path]) == root


def _open_nofollow(root: str, rel: str, *, regular: bool = False) -> int:
    """A read-only fd for `rel` under `root`, opened one component at a time without following any symlink.

    A path check followed by open() can be raced by swapping in a link; opening each component relative to its
    parent's fd with O_NOFOLLOW cannot. regular: `rel` must be a regular file; anything else (a FIFO whose open
    would block, a device, a directory) is refused by a stat before the open, and by an fstat after it.
    """
    components = _components(rel, root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, name in enumerate(components):
            is_last = i == len(components) - 1
            if is_last and regular:
                _refuse_special(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode, rel, root)
            flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_NONBLOCK if is_last else os.O_DIRECTORY)
            child = _open_child(fd, name, flags, rel, root)
            os.close(fd)
            fd = child
        if regular:
            _refuse_special(os.fstat(fd).st_mode, rel, root)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _refuse_special(mode: int, rel: str, root: str) -> None:
    kind = None if stat.S_ISLNK(mode) else special_kind(mode)  # a link is _open_child's to refuse
    if kind is not None:
        raise SpecialFileError(posixpath.join(root, rel), kind)


def _open_child(dir_fd: int, name: str, flags: int, rel: str, root: str) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
            raise PathEscapeError(f"refusing to follow symlink {name!r} in {rel!r} under root {root!r}") from None
        raise


def remove_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def as_storage(storage: Storage | str | os.PathLike) -> Storage:
    if isinstance(storage, Storage):
        return storage
    if isinstance(storage, (str, os.PathLike)):
        return Storage.from_uri(storage)
    raise TypeError(f"expected a Storage or a directory path, got {type(storage).__name__}")


# ---------------------------------------------------------------- roots that must not overlap


def place_under(inner: Storage, outer: Storage) -> str | None:
    """inner's root relative to outer's ("." when they are one place), or None when it lies elsewhere."""
    if inner.is_local != outer.is_local or not _is_within(inner.root, outer.root):
        return None
    return posixpath.relpath(inner.root, outer.root)


def check_layout(root: Storage, teachers: Storage, *, run: str | None = None) -> None:
    """Refuse an experiment root and teacher store that overlap so that one could replace the other's files, and a
    run or experiment name (`run`) that is the teacher store's or the teacher cache's folder.

    Teachers are saved as <teachers>/<name>/, experiments and runs as <root>/<name>/ and the cache as
    <root>/cache/...: with teachers == root, a teacher named `sweep` would replace the experiment `sweep`.
    """
    if place_under(root, teachers) is not None:
        how = "is the same place as" if root.root == teachers.root else "holds"
        raise StorageLayoutError(f"storage.teachers: {teachers.uri} {how} storage.root {root.uri}, so a teacher "
                                 "named like an experiment would replace it; allowed: a teacher store inside the "
                                 "root (the default <storage.root>/teachers) or apart from it")
    inside = place_under(teachers, root)
    taken = {inside.split("/")[0]: "the teacher store"} if inside else {}
    if CACHE_DIR in taken:
        raise StorageLayoutError(f"storage.teachers: {teachers.uri} lies in the teacher cache {root.uri}/{CACHE_DIR}; "
                                 f"allowed: a folder other than {CACHE_DIR}/, such as the default <storage.root>/"
                                 "teachers")
    taken[CACHE_DIR] = "the teacher cache"
    first = run.strip("/").split("/")[0] if run is not None else None
    if first in taken:
        raise StorageLayoutError(f"--name {run}: {root.uri}/{first} is {taken[first]}; allowed: a name other than "
                                 f"{' and '.join(sorted(taken))}")


# ---------------------------------------------------------------- JSON and plain files


def pretty_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=2, allow_nan=False).encode() + b"\n"


def refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def write_json(storage: Storage | str | os.PathLike, rel: str, obj: Any) -> None:
    """Write `obj` as strict JSON (no NaN), atomically."""
    as_storage(storage).write_bytes(rel, pretty_json(obj))


def read_json(storage: Storage | str | os.PathLike, rel: str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Strict JSON of at most max_bytes bytes, nested at most kd_tune.signing.MAX_JSON_DEPTH deep."""
    storage = as_storage(storage)
    data = storage.read_within(rel, max_bytes)
    where = f"{storage.uri.rstrip('/')}/{rel}"
    try:
        return parse_json(data)
    except ValueError as error:
        raise InputError(f"{where}: not valid JSON: {error}; allowed: strict JSON") from None


def write_text(storage: Storage | str | os.PathLike, rel: str, text: str) -> None:
    """Write UTF-8 text, atomically."""
    as_storage(storage).write_bytes(rel, text.encode("utf-8"))


def read_text(storage: Storage | str | os.PathLike, rel: str) -> str:
    return as_storage(storage).read_bytes(rel).decode("utf-8")


def check_out_path(path: str | os.PathLike, *, folder: bool, files: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, an --out that cannot be written: a folder where a file goes (or a file where a folder
    goes), a path under a regular file, or a folder where one of `files` (written into the --out folder) goes."""
    out = Path(path)
    allowed = (f"allowed: {'a folder to write into' if folder else 'the file to write'}, in a folder that exists or "
               "can be made")
    if out.exists() and out.is_dir() != folder:
        raise InputError(f"--out {out}: {'a file' if folder else 'a directory'}; {allowed}")
    above = next((p for p in out.parents if p.exists()), None)  # the nearest that exists: it must be a folder
    if above is not None and not above.is_dir():
        raise InputError(f"--out {out}: its folder is a file; {allowed} ({above} is a file)")
    taken = [name for name in files if (out / name).is_dir()]
    if taken:
        raise InputError(f"--out {out}: {out / taken[0]} is a directory where a file is written; allowed: a folder "
                         f"without folders named {', '.join(files)}")


def upload_tree(local_dir: str | os.PathLike[str], storage: Storage | str | os.PathLike, rel_dir: str) -> None:
    """Copy every regular file under `local_dir` to `rel_dir`, keeping relative paths; symlinks are skipped."""
    storage = as_storage(storage)
    for parent, dirs, names in os.walk(local_dir):
        dirs.sort()
        for name in sorted(names):
            source = Path(parent, name)
            if source.is_file() and not source.is_symlink():
                storage.write_bytes(posixpath.join(rel_dir, source.relative_to(local_dir).as_posix()),
                                    source.read_bytes())
