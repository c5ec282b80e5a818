"""kd_tune.store.storage: confined roots on local and S3 filesystems, atomic writes, bounded reads."""

import os
import time
import tracemalloc

import pytest

from kd_tune.errors import InputError
from kd_tune.signing import SpecialFileError
from kd_tune.store import storage
from kd_tune.store.storage import PathEscapeError, Storage

# ---------------------------------------------------------------- path confinement


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/passwd", "", "a//b", "a\0b"])
def test_escaping_and_malformed_paths_are_refused(tmp_path, rel):
    # rule: absolute parts, '..', empty and NUL components are refused, naming the path and the root
    store = Storage.from_uri(tmp_path / "root")
    with pytest.raises(PathEscapeError, match="root"):
        store.path(rel)


def test_sibling_prefix_is_refused(tmp_path):
    # rule: confinement compares components, so a link to root_evil does not pass as inside root
    (tmp_path / "root").mkdir()
    (tmp_path / "root_evil").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "root_evil")
    store = Storage.from_uri(tmp_path / "root")
    with pytest.raises(PathEscapeError, match="root_evil"):
        store.path("link", "secret")


@pytest.mark.parametrize("target_is_dir", [False, True])
def test_symlinks_out_of_the_root_are_refused(tmp_path, target_is_dir):
    # rule: a file or directory symlink pointing outside the root is refused for paths and reads
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(outside if target_is_dir else outside / "secret")
    store = Storage.from_uri(tmp_path / "root")
    rel = "link/secret" if target_is_dir else "link"
    with pytest.raises(PathEscapeError):
        store.path(rel)
    with pytest.raises(PathEscapeError):
        store.read_bytes(rel)


def test_symlink_swapped_in_after_the_check_is_not_followed(tmp_path):
    # rule: local reads open component by component with O_NOFOLLOW, so a swap after path() is not followed
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "data").mkdir(parents=True)
    (root / "data" / "f").write_text("inside")
    outside.mkdir()
    (outside / "f").write_text("outside")
    store = Storage.from_uri(root)
    store.path("data/f")  # the check passes on the real directory
    (root / "data" / "f").unlink()
    (root / "data").rmdir()
    (root / "data").symlink_to(outside)
    with pytest.raises(PathEscapeError, match="symlink 'data'"):
        storage._open_nofollow(store.root, "data/f")
    (root / "plain").write_text("x")
    fd = storage._open_nofollow(store.root, "plain")
    assert os.read(fd, 10) == b"x"
    os.close(fd)


def test_storage_basics_stay_inside_the_root(tmp_path):
    # rule: the plain file API (json, listdir, exists, delete) works under the root and never deletes the root
    store = Storage.from_uri(tmp_path / "root")
    storage.write_json(store, "a/b.json", {"x": [1, 2]})
    assert storage.read_json(store, "a/b.json") == {"x": [1, 2]}
    assert store.listdir("a") == ["b.json"] and store.exists("a/b.json") and store.is_local
    store.delete_dir("a")
    assert not store.exists("a")
    with pytest.raises(PathEscapeError, match="root"):
        store.delete_dir(".")


def test_uris_parse_without_exposing_credentials(monkeypatch):
    # rule: S3 URIs are bucket/prefix only; keys and other schemes are refused; endpoint scheme comes from the URL
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    store = Storage.from_uri("s3://bucket/runs/exp", endpoint_override="http://127.0.0.1:9", region="eu-west-1")
    assert (store.root, store.uri, store.is_local) == ("bucket/runs/exp", "s3://bucket/runs/exp", False)
    with pytest.raises(ValueError, match="environment") as error:
        Storage.from_uri("s3://bucket/runs?access_key=AKIA&secret_key=SECRET")
    assert "SECRET" not in str(error.value)
    with pytest.raises(ValueError, match="not supported"):
        Storage.from_uri("gs://bucket/runs")
    with pytest.raises(PathEscapeError):
        Storage.from_uri("s3://bucket/../other")


def test_s3_endpoint_from_environment(moto_s3, s3_bucket, monkeypatch):
    # rule: AWS_ENDPOINT_URL is honoured when no endpoint_override is given
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)
    store = Storage.from_uri(f"s3://{s3_bucket}")
    storage.write_json(store, "x.json", {"ok": True})
    assert storage.read_json(store, "x.json") == {"ok": True}




# ---------------------------------------------------------------- bounded reads


def test_read_head_allocates_what_it_reads_not_what_it_may(tmp_path):
    # Rule: read_head(rel, n) returns at most n bytes, and memory follows the bytes read: asking for a terabyte of a
    # 10-byte file allocates nothing large, and a 200 MB (sparse) file costs only the n bytes asked for.
    store = Storage.from_uri(tmp_path)
    store.write_bytes("small", b"0123456789")
    with open(tmp_path / "big", "wb") as f:
        f.truncate(200 * 2**20)
    tracemalloc.start()
    try:
        assert store.read_head("small", 2**40) == b"0123456789"
        assert len(store.read_head("big", 3 * 2**20 + 1)) == 3 * 2**20 + 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20
    assert store.size("big") == 200 * 2**20
    with pytest.raises(FileNotFoundError, match="is not a file"):
        store.size(".")


@pytest.mark.parametrize("content, needle", [
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON: nested 100000 levels deep"),
    (b'{"a": NaN}', "not valid JSON: NaN is not JSON"),
    (b"\xff\xfe[]", "not valid JSON"),
    (b" " * 300_000, f"larger than {2**18} bytes"),
])
def test_read_json_refuses_bad_json_in_one_line_naming_the_file(tmp_path, content, needle):
    # Rule: read_json is bounded in size and depth; bad JSON is an InputError (exit 2) naming the file, one line.
    (tmp_path / "x.json").write_bytes(content)
    started = time.monotonic()
    with pytest.raises(InputError, match=needle) as error:
        storage.read_json(tmp_path, "x.json", max_bytes=2**18)
    message = str(error.value)
    assert message.startswith(f"{tmp_path}/x.json: ") and "\n" not in message and len(message) < 400
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- special files


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["FIFO", "directory", "device"])
def test_reading_a_special_file_is_refused_without_opening_it(tmp_path, kind):
    # rule: a FIFO (whose open would block with no writer), a directory or a device where a file belongs is refused
    # by a stat before any open, through open_input and everything built on it (read_head, read_json)
    if kind == "FIFO":
        os.mkfifo(tmp_path / "manifest.json")
    elif kind == "directory":
        (tmp_path / "manifest.json").mkdir()
    store, name = (Storage.from_uri("/dev"), "zero") if kind == "device" else (Storage.from_uri(tmp_path),
                                                                                "manifest.json")
    with pytest.raises(SpecialFileError, match=f"{name}: not a regular file \\(a {kind}\\); allowed"):
        store.read_head(name, 100)
    with pytest.raises(SpecialFileError, match=f"{name}: not a regular file"):
        storage.read_json(store, name)


# ---------------------------------------------------------------- roots that must not overlap


def layout(tmp_path, root: str, teachers: str) -> tuple[Storage, Storage]:
    return Storage.from_uri(tmp_path / root), Storage.from_uri(tmp_path / teachers)


@pytest.mark.parametrize("root, teachers, needle", [
    ("runs", "runs", "is the same place as storage.root"),  # a teacher `sweep` would replace experiment `sweep`
    ("runs/a", "runs", "holds storage.root"),  # a teacher `a` would replace the whole root
    ("runs/a/b", "runs", "holds storage.root"),
    ("runs", "runs/cache", "lies in the teacher cache"),  # a cache rebuild would replace teachers
    ("runs", "runs/cache/t", "lies in the teacher cache"),
])
def test_overlapping_roots_are_refused(tmp_path, root, teachers, needle):
    # rule: storage.root and storage.teachers may not overlap so that writing one replaces the other's files
    with pytest.raises(storage.StorageLayoutError, match=f"^storage.teachers: .*{needle}") as error:
        storage.check_layout(*layout(tmp_path, root, teachers))
    assert error.value.exit_code == 2 and "\n" not in str(error.value)


@pytest.mark.parametrize("root, teachers", [("runs", "runs/teachers"), ("runs", "teachers"), ("a/runs", "a/t"),
                                            ("runs", "runs/deep/teachers")])
def test_roots_apart_or_teachers_inside_are_accepted(tmp_path, root, teachers):
    # rule: the default (teachers inside the root, in their own folder) and separate roots are fine
    storage.check_layout(*layout(tmp_path, root, teachers))


@pytest.mark.parametrize("teachers, run, needle", [
    ("runs/teachers", "teachers", "is the teacher store"),
    ("runs/deep/teachers", "deep", "is the teacher store"),
    ("runs/teachers", "cache", "is the teacher cache"),
    ("elsewhere", "cache/x", "is the teacher cache"),
])
def test_a_run_named_like_the_teacher_store_or_cache_is_refused(tmp_path, teachers, run, needle):
    # rule: an experiment or run is never written into the teacher store's or the cache's folder
    with pytest.raises(storage.StorageLayoutError, match=f"^--name {run}: .* {needle}"):
        storage.check_layout(*layout(tmp_path, "runs", teachers), run=run)
    storage.check_layout(*layout(tmp_path, "runs", teachers), run="sweep")


def test_the_cache_folder_is_the_one_the_cache_uses():
    # rule: the reserved name is the teacher cache's real folder
    from kd_tune.training.cache import CACHE_ROOT

    assert storage.CACHE_DIR == CACHE_ROOT


@pytest.mark.parametrize("uri", ["s3://bucket/exp?secret_key=s3cr3t", "s3://AKIA:s3cr3t@bucket/exp",
                                 "s3://bucket/exp#s3cr3t"])
def test_uris_with_secrets_are_refused_redacted(uri):
    # rule: a URI carrying user info, a query string or a fragment is refused, and the message never shows them
    assert storage.redact_uri(uri) == "s3://bucket/exp"
    with pytest.raises(InputError) as error:
        storage.check_plain_uri(uri, "EXPERIMENT")
    assert "s3cr3t" not in str(error.value) and "s3://bucket/exp" in str(error.value)
    storage.check_plain_uri("s3://bucket/exp", "EXPERIMENT")
    storage.check_plain_uri("runs/what?not=a-uri", "EXPERIMENT")  # a local path may hold anything
