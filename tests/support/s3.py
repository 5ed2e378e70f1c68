"""A real S3 protocol server for tests: moto's, on a loopback port, with the AWS_* variables boto3 reads
pointing at it (as an operator's environment would point at MinIO or OSS)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

BUCKET = "shop-images"


class S3:
    """moto's S3 server on a fixed loopback port, which can be stopped and started again (its objects stay:
    they live in this process)."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")

    def keys(self) -> list[str]:
        found = self.client().list_objects_v2(Bucket=BUCKET).get("Contents", [])
        return sorted(item["Key"] for item in found)

    def body(self, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())


@contextmanager
def running_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    """The server started, a bucket named BUCKET made, and the environment pointing at it."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    store = S3()
    for name, value in {
        "AWS_ENDPOINT_URL_S3": store.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }.items():
        monkeypatch.setenv(name, value)
    store.server.start()
    store.client().create_bucket(Bucket=BUCKET)
    try:
        yield store
    finally:
        store.server.stop()
        s3_backends[DEFAULT_ACCOUNT_ID]["global"].reset()
