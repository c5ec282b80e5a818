"""The loopback S3 server's side of the tests (moto, started in conftest): its fake credentials and fresh buckets."""

import uuid

import pyarrow.fs as pafs

# moto takes any credentials; the metadata lookup is off so that nothing reaches for a cloud's instance profile
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}
OUTSIDE_ENV = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL")  # the host's own, unset in tests


def create_bucket(endpoint: str, name: str = "") -> str:
    """A new, empty bucket on the server at `endpoint` (http://host:port): `name`, or a fresh one."""
    name = name or f"kd-tune-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[1], scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir(name)
    return name
