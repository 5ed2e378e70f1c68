"""Idempotency keys and asset records, whatever keeps them.

- **Idempotency keys** are single-use, per owner: the first `claim_key` of a key wins, every later one
  loses until the key expires (24 h) or is released (the submission it guarded definitely failed).
- **Assets** are records over bytes: an id (a UUID) names a record, an owner holds it, and the bytes are
  found by `place` (a file reference: kind, subfolder, filename, as `/view` takes one). Uploads of the same
  bytes by one owner share one file (found by `hash`); a job's outputs are assets too, with ids derived
  from the job and the file (`output_asset_id`), recorded when they are first shown.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

KEY_TTL_S = 24 * 3600.0
# Output asset ids are UUIDs derived from (job, file): stable across reads, nodes and restarts.
OUTPUTS = uuid.UUID("6f0e1c52-5d0a-4f7e-9d7a-3b1f0a7c2e11")


def output_asset_id(job_id: str, kind: str, subfolder: str, filename: str) -> str:
    return str(uuid.uuid5(OUTPUTS, "\0".join((job_id, kind, subfolder, filename))))


@dataclass(frozen=True)
class Place:
    """Where an asset's bytes are: a file named as `/view` names one, in the folders of a user's space
    (`Folders.space`; "" for the shared folders, an admin's)."""

    kind: str  # input, output or temp
    subfolder: str
    filename: str
    space: str = ""

    def to_json(self) -> dict[str, str]:
        return {"type": self.kind, "subfolder": self.subfolder, "filename": self.filename, "space": self.space}

    @classmethod
    def of(cls, data: dict[str, Any]) -> Place:
        return cls(str(data["type"]), str(data["subfolder"]), str(data["filename"]), str(data.get("space") or ""))

    @property
    def key(self) -> str:
        """One text per file: records over the same file share it."""
        return "/".join((self.space, self.kind, self.subfolder, self.filename))


@dataclass(frozen=True)
class Asset:
    id: str
    owner: str
    place: Place
    size: int
    content_type: str
    created: float
    hash: str | None = None  # "blake3:<hex>"; None until known (outputs are hashed when first read)
    file_path: str | None = None  # the name its uploader gave
    expires: float | None = None  # when it is deleted (None: kept as long as its job, or for ever)
    job_id: str | None = None  # the job that made it (outputs)
    node_id: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "place": self.place.to_json(),
            "size": self.size,
            "content_type": self.content_type,
            "created": self.created,
            "hash": self.hash,
            "file_path": self.file_path,
            "expires": self.expires,
            "job_id": self.job_id,
            "node_id": self.node_id,
            "tags": list(self.tags),
        }

    @classmethod
    def of(cls, data: dict[str, Any]) -> Asset:
        return cls(
            id=str(data["id"]),
            owner=str(data["owner"]),
            place=Place.of(data["place"]),
            size=int(data["size"]),
            content_type=str(data["content_type"]),
            created=float(data["created"]),
            hash=data.get("hash"),
            file_path=data.get("file_path"),
            expires=data.get("expires"),
            job_id=data.get("job_id"),
            node_id=data.get("node_id"),
            tags=tuple(data.get("tags") or ()),
        )


class Records(Protocol):
    # -- idempotency keys ----------------------------------------------------------------------------
    def claim_key(self, owner: str, key: str, ttl_s: float = KEY_TTL_S) -> bool:
        """True for the first claim of `key` by `owner` (until it expires or is released), False after."""
        ...

    def release_key(self, owner: str, key: str) -> None:
        """Free a claimed key: what it guarded definitely did not happen."""
        ...

    # -- assets --------------------------------------------------------------------------------------
    def add_asset(self, asset: Asset) -> Asset:
        """Record `asset`; if its id is recorded already, nothing changes and the recorded one comes back."""
        ...

    def asset(self, asset_id: str) -> Asset | None: ...

    def with_hash(self, owner: str, hash: str) -> Asset | None:
        """One of `owner`'s assets over the bytes of `hash` (an upload's), or None."""
        ...

    def set_hash(self, asset_id: str, hash: str) -> None:
        """Note an asset's hash once it is known (outputs are hashed when first read)."""
        ...

    def delete_asset(self, asset_id: str) -> tuple[Asset, bool] | None:
        """Forget a record: it, and whether it was the last record over its file, anyone's (which may then
        go); None if there was none."""
        ...

    def forget_outputs(self, job_ids: list[str]) -> int:
        """Forget the output records of jobs that are gone (their files are the history's to keep or not)."""
        ...

    def expired_assets(self, now: float, limit: int = 100) -> list[Asset]:
        """Records whose `expires` is past, oldest first."""
        ...

    def close(self) -> None: ...
