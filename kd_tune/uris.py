"""What a storage root or an S3 endpoint may be, checked on the text alone (no pyarrow, no network): a config names
a bad one in its one line, instead of pyarrow failing with a traceback when the first file is written."""

from __future__ import annotations

from urllib.parse import urlsplit

ROOTS_ALLOWED = "allowed: a local path other than /, file:///path or s3://bucket/prefix"
ENDPOINTS_ALLOWED = "allowed: http(s)://host[:port] with no user info or path"


def root_problem(uri: str) -> str | None:
    """Why `uri` cannot be a storage root (kd_tune.store.storage.Storage.from_uri opens the others), or None."""
    parts = urlsplit(uri) if "://" in uri else None
    if parts is not None and parts.scheme == "s3":
        problem = None if parts.netloc else "an s3:// URI without a bucket"
    elif parts is not None and parts.scheme != "file":
        problem = f"scheme {parts.scheme!r} is not a storage"
    elif parts is not None and parts.netloc not in ("", "localhost"):
        problem = "a file:// URI of another host"
    else:  # a plain path or file:///path: "/" would put every experiment beside the system's folders
        problem = None if (uri if parts is None else parts.path).strip("/") else "the filesystem root"
    return problem and f"{problem}; {ROOTS_ALLOWED}"


def endpoint_problem(url: str) -> str | None:
    """Why `url` cannot be an S3 endpoint (pyarrow takes host[:port] and a scheme, nothing more), or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc or parts.path not in ("", "/"):
        return f"not an S3 endpoint; {ENDPOINTS_ALLOWED}"
    return None
