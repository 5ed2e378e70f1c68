"""Who a request, and the job it queues, belongs to: one value resolved at the edge of the server and
carried down through the queue and the worker to every node.

The user is the id of the user a token stands for: the token's name for the first user of that name, then
`name~2` and so on (security/tokens.py), so a new token under a revoked name starts afresh. With
authentication off, every caller is the local operator (`LOCAL`), an
admin whose files are the server's own folders, as they are without users at all. A user's files live
in a space of their own below those folders (`Folders.space`); an admin's are the folders themselves,
which hold every user's space, so an admin can read everything and a user only their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from zimage_serve.limits import Limits

ADMIN, USER = "admin", "user"
ROLES = (ADMIN, USER)
# A user's name is a folder name too: plain ASCII, no dots in front, short enough for every file system.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CAPPED = ("pixels", "steps")  # the limits a token may lower (and carry into its jobs)


def valid_name(name: str) -> bool:
    return bool(NAME.match(name)) and not name.endswith(".")


@dataclass(frozen=True)
class Identity:
    user: str  # the user's id (owner of jobs and files); "" for the local operator (authentication off)
    role: str = ADMIN
    address: str = ""  # the client's address (after a trusted proxy's X-Forwarded-For)
    limits: Limits | None = field(default=None, compare=False)  # the server's, lowered by the token's
    name: str = field(default="", compare=False)  # the token's name, when it is not the id itself

    @property
    def token_name(self) -> str:
        return self.name or self.user

    @property
    def admin(self) -> bool:
        return self.role == ADMIN

    @property
    def space(self) -> str | None:
        """The folder below the shared ones that holds this caller's files; None: the shared ones."""
        return None if self.admin else self.user

    def may_see(self, owner: str) -> bool:
        """Whether a job or file of `owner` is this caller's to read, change or delete."""
        return self.admin or owner == self.user

    def owner_filter(self) -> str | None:
        """The owner listings are narrowed to: None for an admin (everyone's)."""
        return None if self.admin else self.user

    # -- stored with a job ---------------------------------------------------------------------------
    def job_context(self, images: int = 0, images_per_day: int | None = None) -> JobContext:
        """What the worker needs of the caller, stored with the job (its owner has a column of its own)."""
        caps = {} if self.limits is None else {name: getattr(self.limits, name) for name in sorted(self.limits.capped)}
        return JobContext(self.role, self.address, caps, images, images_per_day)

    @classmethod
    def of_job(cls, owner: str, context: JobContext, server_limits: Limits) -> Identity:
        limits = server_limits.for_token(owner, **{k: context.limits.get(k) for k in CAPPED})
        return cls(owner, context.role, context.address, limits)


@dataclass(frozen=True)
class JobContext:
    """Who queued a job, beside its owner, and what they were allowed then: made from the caller's
    identity at submission, stored with the job (as JSON), and read back by the worker that runs it."""

    role: str = ADMIN
    address: str = ""
    limits: dict[str, int] = field(default_factory=dict)  # the limits the token lowered (pixels, steps)
    images: int = 0  # the images the owner was charged at submission (the graph's count)
    images_per_day: int | None = None  # the owner's daily allowance then: the run's real count is held to it

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"role": self.role}
        if self.address:
            found["address"] = self.address
        if self.limits:
            found["limits"] = dict(self.limits)
        if self.images:
            found["images"] = self.images
        if self.images_per_day is not None:
            found["images_per_day"] = self.images_per_day
        return found

    @classmethod
    def from_json(cls, data: object) -> JobContext:
        """From what a job's row holds (every version's: keys may be missing; a bad value is dropped)."""
        if not isinstance(data, dict) or not data:
            return cls()
        limits = data.get("limits")
        images, per_day = data.get("images"), data.get("images_per_day")
        return cls(
            role=data["role"] if data.get("role") in ROLES else ADMIN,
            address=data["address"] if isinstance(data.get("address"), str) else "",
            limits={k: v for k, v in limits.items() if k in CAPPED and isinstance(v, int)}
            if isinstance(limits, dict)
            else {},
            images=images if isinstance(images, int) and images >= 0 else 0,
            images_per_day=per_day if isinstance(per_day, int) else None,
        )


LOCAL = Identity("")
