"""The output store as the routes see it: the objects' URLs that history entries, `/api/jobs`, Comfy API v2
and webhooks carry, and the bytes of outputs whose local file was emptied after upload (--no-keep-local),
which `/view`, v2's content and OpenAI's images read from the bucket instead.

With no output store configured every method answers at once, without touching a database or the network.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from zimage_serve.errors import ZImageError
from zimage_serve.storage.bucket import Bucket
from zimage_serve.storage.uploads import Uploads, listed_items

log = logging.getLogger(__name__)


class StoreUnavailable(ZImageError):
    """An emptied output's object could not be read from the store (503: try again)."""


@dataclass(frozen=True)
class ObjectLink:
    key: str
    size: int
    url: str
    expires_at: float | None  # None: a public URL


FileLinks = dict[tuple[str, str], ObjectLink]  # (subfolder, filename) as the job's outputs name them → its object


class StoredOutputs:
    def __init__(self, bucket: Bucket | None, uploads: Uploads | None) -> None:
        self.bucket = bucket if uploads is not None else None
        self.uploads = uploads

    @property
    def enabled(self) -> bool:
        return self.bucket is not None

    def links(self, job_ids: Iterable[str]) -> dict[str, FileLinks]:
        """The stored objects of these jobs' output files, by job."""
        if self.bucket is None or self.uploads is None:
            return {}
        found: dict[str, FileLinks] = {}
        for job_id, objects in self.uploads.objects_of(job_ids).items():
            found[job_id] = {
                (o.subfolder, o.filename): ObjectLink(o.key, o.size, *self.bucket.url(o.key)) for o in objects
            }
        return found

    def job_links(self, job_id: str) -> FileLinks:
        return self.links([job_id]).get(job_id, {})

    def job_objects(self, job_id: str) -> dict[tuple[str, str], dict[str, str]]:
        """What a webhook says of each stored file: its object's URL, and where it is (`s3://BUCKET/KEY`)."""
        if self.bucket is None:
            return {}
        return {
            place: {"url": found.url, "object": f"s3://{self.bucket.name}/{found.key}"}
            for place, found in self.job_links(job_id).items()
        }

    def emptied_bytes(self, kind: str, space: str, subfolder: str, filename: str, path: str) -> bytes | None:
        """The bytes of an output file whose local copy was emptied after its upload (call in a thread); None
        for any other file (read it from the disk), or when the bucket has no such object."""
        if self.bucket is None or kind != "output":
            return None
        try:
            if os.path.getsize(path) != 0:
                return None
        except OSError:
            return None
        key = self.bucket.key(space, subfolder, filename)
        try:
            return self.bucket.get(key)
        except Exception as exc:  # the store away, or refusing: the client is told so, never a 500
            log.warning("output %s could not be read from %s: %s", key, self.bucket.location, exc)
            raise StoreUnavailable(f"{filename}: the output store could not be read just now; try again") from exc


def with_links(outputs: dict[str, Any], links: FileLinks) -> None:
    """Each output file of a history entry that is stored gains its object's URL (see `_link`)."""
    if not links:
        return
    for item in listed_items(outputs):
        _link(item, links)


def _link(item: dict[str, Any], links: FileLinks) -> None:
    """An output file's entry gains its object's `url` (and `url_expires_at`, Unix seconds, for a presigned
    one) beside ComfyUI's filename, subfolder and type, when the file is stored."""
    if item.get("type", "output") != "output":
        return
    found = links.get((str(item.get("subfolder") or ""), str(item.get("filename"))))
    if found is not None:
        item["url"] = found.url
        if found.expires_at is not None:
            item["url_expires_at"] = int(found.expires_at)
