"""A local S3-compatible server (moto's server mode) and the env vars that point pyarrow/boto3 at it."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class LocalS3:
    """A running moto S3 server on 127.0.0.1 with fake credentials."""

    endpoint: str  # http://127.0.0.1:PORT
    env: dict[str, str] = field(default_factory=dict)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def new_bucket(self, prefix: str = "flagsim") -> str:
        """Create an empty bucket with a unique name and return the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "", markers: bool = False) -> list[str]:
        """Object keys under `prefix` as the server reports them (boto3, not pyarrow).

        pyarrow writes empty `dir/` marker objects when it creates directories; they are left
        out unless `markers` is true.
        """
        out: list[str] = []
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            out.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(k for k in out if markers or not k.endswith("/"))


def s3_env(endpoint: str) -> dict[str, str]:
    """What every process that touches the store needs: pyarrow and boto3 both read these."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "flagsim-test",
        "AWS_SECRET_ACCESS_KEY": "flagsim-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextmanager
def running_s3() -> Iterator[LocalS3]:
    """Start moto's threaded server on a free port; stop it on exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        yield LocalS3(endpoint=endpoint, env=s3_env(endpoint))
    finally:
        server.stop()


@contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """Set env vars for the duration (this process and the children it starts), then restore."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
