"""API tokens: made once and shown once, stored only as SHA-256 hashes, revoked at once.

The tokens live in `<data-dir>/auth.sqlite3`, written by `zimage tokens` and the admin API, read by the
server: it keeps them in memory and reads them again whenever another process changed the file (checked
at most every `REFRESH_S`), so a token revoked on the command line stops working within a second.

A token is 256 random bits: a plain hash is enough to store it (no password hashing is needed for a
secret nobody chose), and it is looked up by its hash, so no comparison leaks anything through timing.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zimage_serve.errors import ZImageError
from zimage_serve.identity import ROLES, USER, valid_name
from zimage_serve.private import private_file

PREFIX = "zis_"
REFRESH_S = 0.2  # how stale the server's copy may get: revocation takes effect within this (and a request)
TOUCH_S = 5.0  # how often the server writes tokens' "last used" times
SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    rpm INTEGER,
    images_per_day INTEGER,
    max_queued INTEGER,
    max_pixels INTEGER,
    max_steps INTEGER,
    max_storage INTEGER,
    max_files INTEGER,
    created REAL NOT NULL,
    last_used REAL,
    revoked REAL,
    user TEXT
);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    hash TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL
);
"""
SESSION_PREFIX = "zss_"
SESSION_S = 30 * 24 * 3600  # a browser's sign-in lasts a month, or until it signs out or the token goes
SESSIONS_PER_TOKEN = 20  # signing in again past this ends the token's oldest session
SESSION_ID_CHARS = 16  # of a session's hash: how sessions are named when listed and ended
LIMITS = ("rpm", "images_per_day", "max_queued", "max_pixels", "max_steps", "max_storage", "max_files")
# A user id other than the name itself: `alice~2` is the second user named alice. No name holds a '~',
# so an id never collides with another user's name.
GENERATION = "~"


class TokenError(ZImageError):
    """A token operation that cannot be done (an unknown name, a name taken ...); the message says why.
    `conflict`: the name is taken by an active token."""

    def __init__(self, message: str, conflict: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict


@dataclass(frozen=True)
class Token:
    name: str
    role: str
    rpm: int | None = None
    images_per_day: int | None = None
    max_queued: int | None = None
    max_pixels: int | None = None
    max_steps: int | None = None
    max_storage: int | None = None  # bytes of uploads, saved workflows and templates (security/storage.py)
    max_files: int | None = None
    created: float = 0.0
    last_used: float | None = None
    revoked: float | None = None
    user: str = ""  # the user the token stands for: who owns its jobs, files, templates and history

    @property
    def owner(self) -> str:
        return self.user or self.name

    @property
    def active(self) -> bool:
        return self.revoked is None

    def public(self) -> dict[str, Any]:
        """Everything about the token but the token (which is never stored)."""
        return asdict(self)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class TokenStore:
    def __init__(self, path: Path) -> None:
        self.path = private_file(path)
        self._lock = threading.Lock()
        # Held by `revoke` from its write to its discard, and by `take_revoked`: a revocation made here is
        # never also handed out as another's (the caller acts on it once).
        self._revoking = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._upgrade()
        self._by_hash: dict[str, Token] = {}
        self._sessions: dict[str, tuple[str, float]] = {}  # hash → (the token's hash, expiry)
        self._version = -1
        self._checked = 0.0
        self._used: dict[str, float] = {}  # name → last use not yet written
        self._revoked: set[str] = set()
        self._touched = time.monotonic()
        self.refresh(force=True)

    def close(self) -> None:
        self.flush_use()
        with self._lock:
            self._db.close()

    def _upgrade(self) -> None:
        """Files written by earlier versions: the columns added since; and, from before users had ids, each
        token's user is its name, as its data's folders are."""
        added = {"user": "TEXT", "max_storage": "INTEGER", "max_files": "INTEGER"}  # columns of later versions
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(tokens)")}
        if columns >= set(added) and self._db.execute("SELECT 1 FROM tokens WHERE user IS NULL").fetchone() is None:
            return
        with self._writing():
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(tokens)")}
            for column, kind in added.items():
                if column not in columns:
                    self._db.execute(f"ALTER TABLE tokens ADD COLUMN {column} {kind}")
            self._db.execute("UPDATE tokens SET user = name WHERE user IS NULL")
            self._db.execute("INSERT OR IGNORE INTO users (id, name, created) SELECT user, name, created FROM tokens")

    # -- managing ------------------------------------------------------------------------------------
    def create(self, name: str, role: str = USER, inherit: bool = False, **limits: int | None) -> tuple[str, Token]:
        """A new token for `name`: (the token, shown once, and its record). A revoked name may be reused:
        the new token is a new user, who sees nothing of the old one's jobs, files or templates, unless
        `inherit` says it continues the user of the name's last token."""
        if not valid_name(name):
            raise TokenError(
                f"NAME: {name!r} is not a valid name (letters, digits, '_', '.', '-'; at most 64; not starting "
                "with '.' or '-')"
            )
        if role not in ROLES:
            raise TokenError(f"--role: {role!r} is not a role; use one of {', '.join(ROLES)}")
        unknown = set(limits) - set(LIMITS)
        if unknown:
            raise TokenError(f"unknown limit {sorted(unknown)[0]}")
        for key, value in limits.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise TokenError(f"--{key.replace('_', '-')}: must be a whole number of at least 1")
        token = PREFIX + secrets.token_urlsafe(32)
        created = time.time()
        with self._writing():
            existing = self._db.execute("SELECT revoked, user FROM tokens WHERE name = ?", (name,)).fetchone()
            if existing is not None and existing[0] is None:
                raise TokenError(f"NAME: a token named {name!r} exists; revoke it first", conflict=True)
            if inherit and existing is None:
                raise TokenError(f"--inherit: no earlier token named {name!r} to continue")
            user = existing[1] if inherit else self._new_user(name, created)
            record = Token(name, role, created=created, user=user, **{k: limits.get(k) for k in LIMITS})
            self._db.execute("DELETE FROM tokens WHERE name = ?", (name,))
            columns = ["name", "hash", "role", *LIMITS, "created", "user"]
            self._db.execute(
                f"INSERT INTO tokens ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                (name, hash_token(token), role, *(getattr(record, k) for k in LIMITS), created, user),
            )
        self.refresh(force=True)
        return token, record

    def _new_user(self, name: str, created: float) -> str:
        """An id no user has had: the name itself for its first user, then `name~2`, `name~3` ..."""
        taken = {row[0] for row in self._db.execute("SELECT id FROM users WHERE name = ?", (name,))}
        user, generation = name, 1
        while user in taken:
            generation += 1
            user = f"{name}{GENERATION}{generation}"
        self._db.execute("INSERT INTO users (id, name, created) VALUES (?, ?, ?)", (user, name, created))
        return user

    def revoke(self, name: str) -> Token:
        with self._revoking:
            with self._writing():
                changed = self._db.execute(
                    "UPDATE tokens SET revoked = ? WHERE name = ? AND revoked IS NULL", (time.time(), name)
                ).rowcount
            if not changed:
                known = any(t.name == name for t in self.tokens())
                raise TokenError(f"NAME: {name!r} is {'revoked already' if known else 'not a token'}")
            self.refresh(force=True)
            record = next(t for t in self.tokens() if t.name == name)
            self._revoked.discard(record.owner)  # revoked here: the caller acts on it (take_revoked: the others')
            return record

    def user_named(self, name: str) -> str | None:
        """The user the token named `name` stands for (a name has one token at a time), or None."""
        return next((token.owner for token in self.tokens() if token.name == name), None)

    def tokens(self) -> list[Token]:
        self.flush_use()
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(Token.__dataclass_fields__)} FROM tokens ORDER BY name")
            return [Token(*row) for row in rows.fetchall()]

    # -- the server's side ---------------------------------------------------------------------------
    def lookup(self, token: str) -> Token | None:
        """The token's record (revoked ones too: the caller says why it refuses), or None if unknown."""
        self.refresh()
        return self._by_hash.get(hash_token(token))

    def refresh(self, force: bool = False) -> None:
        """Read the tokens again if another process changed them (at most every REFRESH_S unless forced)."""
        now = time.monotonic()
        if not force and now - self._checked < REFRESH_S:
            return
        with self._lock:
            self._checked = now
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version == self._version and not force:
                return
            self._version = version
            fields = ", ".join(["hash", *Token.__dataclass_fields__])
            rows = self._db.execute(f"SELECT {fields} FROM tokens").fetchall()
            sessions = self._db.execute("SELECT hash, token_hash, expires FROM sessions").fetchall()
        self._sessions = {h: (token_hash, expires) for h, token_hash, expires in sessions}
        before = {t.owner for t in self._by_hash.values() if t.active}
        self._by_hash = {row[0]: Token(*row[1:]) for row in rows}
        after = {t.owner for t in self._by_hash.values() if t.active}
        self._revoked |= before - after

    def take_revoked(self) -> list[str]:
        """The users whose tokens were revoked (or removed) since the last call, elsewhere than by `revoke`."""
        with self._revoking:
            self.refresh()
            revoked, self._revoked = self._revoked, set()
        return sorted(revoked)

    def used(self, name: str) -> None:
        """Note a use; written with the others every few seconds (`flush_use`), not on every request."""
        self._used[name] = time.time()

    def flush_use(self, every: float = 0.0) -> None:
        if not self._used or time.monotonic() - self._touched < every:
            return
        used, self._used = self._used, {}
        self._touched = time.monotonic()
        with self._writing():
            self._db.executemany(
                "UPDATE tokens SET last_used = max(coalesce(last_used, 0), ?) WHERE name = ?",
                [(when, name) for name, when in used.items()],
            )

    # -- browser sessions (the sign-in page's cookie) -------------------------------------------------
    def open_session(self, token: str) -> tuple[str, Token] | None:
        """A new session for a valid token: (the session's secret, for the cookie; the token's record).
        Only its hash is stored; it ends when the token is revoked."""
        record = self.lookup(token)
        if record is None or not record.active:
            return None
        secret = SESSION_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        with self._writing():
            self._db.execute("DELETE FROM sessions WHERE expires < ?", (now,))
            self._db.execute(
                "INSERT INTO sessions (hash, token_hash, created, expires) VALUES (?, ?, ?, ?)",
                (hash_token(secret), hash_token(token), now, now + SESSION_S),
            )
            self._db.execute(  # one token's sessions are bounded: the oldest beyond the bound end
                "DELETE FROM sessions WHERE token_hash = ? AND hash NOT IN "
                "(SELECT hash FROM sessions WHERE token_hash = ? ORDER BY created DESC LIMIT ?)",
                (hash_token(token), hash_token(token), SESSIONS_PER_TOKEN),
            )
        self.refresh(force=True)
        return secret, record

    def session(self, secret: str) -> Token | None:
        """The token a session stands for (revoked ones too: the caller refuses those), or None."""
        self.refresh()
        found = self._sessions.get(hash_token(secret))
        if found is None or found[1] < time.time():
            return None
        return self._by_hash.get(found[0])  # a token made again under the same name is another token

    def close_session(self, secret: str) -> None:
        with self._writing():
            self._db.execute("DELETE FROM sessions WHERE hash = ?", (hash_token(secret),))
        self.refresh(force=True)

    def sessions(self, name: str | None = None) -> list[dict[str, Any]]:
        """Open sign-in sessions (`name`'s token's only, when given), newest first: an id (the start of the
        secret's hash: it names the session, and signs nobody in), the token's name, when it opened and
        when it ends."""
        where, args = ("AND tokens.name = ?", (name,)) if name is not None else ("", ())
        with self._lock:
            rows = self._db.execute(
                "SELECT sessions.hash, tokens.name, sessions.created, sessions.expires FROM sessions "
                f"JOIN tokens ON tokens.hash = sessions.token_hash WHERE sessions.expires >= ? {where} "
                "ORDER BY sessions.created DESC",
                (time.time(), *args),
            ).fetchall()
        return [
            {"id": digest[:SESSION_ID_CHARS], "user": user, "created": created, "expires": expires}
            for digest, user, created, expires in rows
        ]

    def end_sessions(self, name: str | None, session_id: str | None = None) -> int:
        """End sign-in sessions: `name`'s token's (everyone's: None), all of them or the one `session_id`
        names; how many ended."""
        if session_id is not None and (len(session_id) != SESSION_ID_CHARS or not session_id.isalnum()):
            return 0
        conditions: list[str] = []
        args: list[str | int] = []
        if name is not None:
            conditions.append("token_hash IN (SELECT hash FROM tokens WHERE name = ?)")
            args.append(name)
        if session_id is not None:
            conditions.append("substr(hash, 1, ?) = ?")
            args += [SESSION_ID_CHARS, session_id]
        with self._writing():
            ended = self._db.execute(
                "DELETE FROM sessions" + (" WHERE " + " AND ".join(conditions) if conditions else ""), args
            ).rowcount
        self.refresh(force=True)
        return int(ended)

    @staticmethod
    def session_id(secret: str) -> str:
        return hash_token(secret)[:SESSION_ID_CHARS]

    def empty(self) -> bool:
        self.refresh()
        return not any(t.active for t in self._by_hash.values())

    @contextmanager
    def _writing(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
