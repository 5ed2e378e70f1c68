"""The bucket outputs go to: any S3-compatible store (AWS S3, MinIO, Alibaba Cloud OSS ...), named
`s3://BUCKET/PREFIX` and reached through boto3.

boto3 finds the endpoint, region and credentials as the AWS CLI does: the environment (`AWS_ENDPOINT_URL_S3`
or `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_PROFILE`) or the
shared files (`~/.aws/credentials`, `~/.aws/config`, where `addressing_style` is set for a store that wants
one). An object's key mirrors the file's place below the output folder, so a user's objects are under their
own prefix: `PREFIX/users/<user>/<subfolder>/<file>`, an admin's (the shared folder's) `PREFIX/<subfolder>/<file>`.
"""

from __future__ import annotations

import mimetypes
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from zimage_serve.errors import ZImageError
from zimage_serve.workflow.folders import USERS

BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rules (OSS and MinIO keep to them)
MAX_URL_LIFETIME_S = 7 * 86400  # the longest a SigV4 presigned URL may hold
MULTIPART_BYTES = 8 * 1024 * 1024  # boto3's own threshold for uploading in parts


class FileChanged(ZImageError):
    """A file was replaced or changed between its look and its upload."""


class StoreLocationError(ZImageError):
    """An --output-store (or its URL options) that names no usable place; the message names the option."""


@dataclass(frozen=True)
class OutputStoreSettings:
    location: str  # s3://BUCKET/PREFIX
    keep_local: bool = True  # False: a file's bytes leave the disk once its object is stored (an empty name stays)
    public_url: str = ""  # objects are readable at PUBLIC_URL/KEY (a CDN, a public bucket); else presigned URLs
    url_lifetime_s: int = 3600  # how long a presigned URL holds
    retry_for_s: float = 24 * 3600.0  # how long a job's uploads are tried before they are given up on
    first_delay_s: float = 2.0
    max_delay_s: float = 300.0
    concurrency: int = 4
    poll_s: float = 0.5  # how often the outbox is looked at while it is empty

    def __post_init__(self) -> None:
        parse_location(self.location)
        if self.public_url and not self.public_url.startswith(("https://", "http://")):
            raise StoreLocationError(f"--output-public-url: {self.public_url[:80]!r} is not an http(s) URL")
        if not 1 <= self.url_lifetime_s <= MAX_URL_LIFETIME_S:
            raise StoreLocationError(
                f"--output-url-lifetime: {self.url_lifetime_s} s is not between 1 s and 7 days (SigV4's limit)"
            )


def parse_location(location: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://BUCKET/PREFIX`; an error naming --output-store when it is not one."""
    scheme, _, rest = location.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme != "s3" or not BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise StoreLocationError(
            f"--output-store: {location[:80]!r} is not s3://BUCKET/PREFIX with a bucket name of 3 to 63 lowercase "
            "letters, digits, '.' or '-'"
        )
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") or not p.isprintable() or "\\" in p for p in parts) or len(prefix) > 512:
        raise StoreLocationError(f"--output-store: the prefix {prefix[:80]!r} must be plain path parts")
    return bucket, "/".join(parts)


class Bucket:
    """The bucket and prefix outputs are uploaded to; thread-safe (boto3's clients are)."""

    def __init__(self, settings: OutputStoreSettings) -> None:
        self.settings = settings
        self.name, self.prefix = parse_location(settings.location)
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return f"s3://{self.name}/{self.prefix}" if self.prefix else f"s3://{self.name}"

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3  # with the first upload: the server starts without it
                from botocore.config import Config

                config = Config(
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=30,
                    signature_version="s3v4",
                )
                self._client = boto3.session.Session().client("s3", config=config)
            return self._client

    def key(self, space: str, subfolder: str, filename: str) -> str:
        """The object key of an output file: its place below the shared output folder, under the prefix."""
        return "/".join(p for p in (self.prefix, f"{USERS}/{space}" if space else "", subfolder, filename) if p)

    def put(self, path: str, key: str, job_id: str, expected: os.stat_result) -> None:
        """Upload the file at `path` as `key`, if it is still the file `expected` (never another file put in
        its place since, such as the empty one a stored file leaves): FileChanged otherwise."""
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        extra = {"ContentType": content_type, "Metadata": {"job-id": job_id}}
        with open(path, "rb") as body:
            found = os.fstat(body.fileno())
            if (found.st_ino, found.st_size, found.st_mtime_ns) != (
                expected.st_ino,
                expected.st_size,
                expected.st_mtime_ns,
            ):
                raise FileChanged(f"{key}: the file changed before it was uploaded; it is looked at again")
            if found.st_size >= MULTIPART_BYTES:  # in parts, several at once, each retried on its own
                self.client().upload_fileobj(body, self.name, key, ExtraArgs=extra)
            else:  # one request: a transfer manager's threads cost more than an image
                self.client().put_object(Bucket=self.name, Key=key, Body=body, **extra)

    def get(self, key: str) -> bytes | None:
        """An object's bytes; None when there is no such object."""
        client = self.client()
        try:
            answer = client.get_object(Bucket=self.name, Key=key)
        except client.exceptions.NoSuchKey:
            return None
        return bytes(answer["Body"].read())

    def size(self, key: str) -> int | None:
        """An object's size; None when there is no such object."""
        client = self.client()
        try:
            answer = client.head_object(Bucket=self.name, Key=key)
        except client.exceptions.ClientError as exc:
            # 403: what S3 answers for a missing object to a caller that may not list the bucket
            if exc.response.get("Error", {}).get("Code") in ("404", "403", "NoSuchKey", "NotFound", "Forbidden"):
                return None
            raise
        return int(answer["ContentLength"])

    def url(self, key: str) -> tuple[str, float | None]:
        """Where a client fetches an object, and until when that URL holds (None: a public one, always)."""
        if self.settings.public_url:
            return f"{self.settings.public_url.rstrip('/')}/{quote(key)}", None
        lifetime = self.settings.url_lifetime_s
        url = self.client().generate_presigned_url(
            "get_object", Params={"Bucket": self.name, "Key": key}, ExpiresIn=lifetime
        )
        return str(url), time.time() + lifetime
