"""Everything the server needs to decide who may do what: the settings, the tokens, the network policy,
the rate limiter, the word filter and the audit log, built once per server process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from zimage_serve.errors import ZImageError
from zimage_serve.identity import Identity
from zimage_serve.limits import Limits, StorageLimits
from zimage_serve.security.audit import MAX_BYTES, ROTATE_BYTES, AuditLog, Retention
from zimage_serve.security.blocklist import Blocklist
from zimage_serve.security.network import NetworkPolicy, is_loopback_bind
from zimage_serve.security.rate import RateLimiter
from zimage_serve.security.refusals import RefusalTally
from zimage_serve.security.tokens import REFRESH_S, TOUCH_S, Token, TokenStore

log = logging.getLogger(__name__)
AUTH_MODES = ("auto", "on", "off")
# Headers a reverse proxy adds: a request carrying one came through a proxy, from some other machine.
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip")
AUDIT_PROMPTS = ("text", "hash")


class SecuritySettingError(ZImageError):
    """A bad security setting; the message names the option."""


@dataclass(frozen=True)
class SecuritySettings:
    auth: str = "auto"  # auto: on unless the server binds to loopback only with no proxy in front
    allow_ip: tuple[str, ...] = ()
    trusted_proxy: tuple[str, ...] = ()
    allow_origin: tuple[str, ...] = ()
    public_url: str | None = None  # the base of absolute URLs the server hands out
    blocklist: tuple[Path, ...] = ()
    audit_prompts: str = "text"  # or "hash": the audit log keeps only a prompt's SHA-256
    audit_rotate_bytes: int = ROTATE_BYTES
    audit_max_bytes: int = MAX_BYTES
    audit_retention_days: float = 0
    user_storage: StorageLimits = field(default_factory=StorageLimits)  # each user's, unless their token says

    @property
    def audit_retention(self) -> Retention:
        """Segments of at most an eighth of the log's size, so retention removes it a little at a time."""
        segment = max(64 * 1024, min(self.audit_rotate_bytes, self.audit_max_bytes // 8))
        return Retention(segment, self.audit_max_bytes, self.audit_retention_days)

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise SecuritySettingError(f"--auth: {self.auth!r} is not one of {', '.join(AUTH_MODES)}")
        if self.audit_prompts not in AUDIT_PROMPTS:
            raise SecuritySettingError(
                f"--audit-prompts: {self.audit_prompts!r} is not one of {', '.join(AUDIT_PROMPTS)}"
            )
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise SecuritySettingError(f"--public-url: {self.public_url!r} must start with http:// or https://")


def auth_decision(mode: str, listen: str, trusted_proxy: tuple[str, ...]) -> tuple[bool, str]:
    """Whether authentication is on, and why, as the start-up line says it. `auto` is off only where every
    client is on this machine: a loopback bind with no proxy in front (a proxy serves other machines)."""
    if mode != "auto":
        return mode == "on", f"--auth {mode}"
    if trusted_proxy:
        return True, "--auth auto, and requests come through a proxy (--trusted-proxy)"
    if not is_loopback_bind(listen):
        return True, f"--auth auto, and the server listens on {listen}, beyond this machine"
    return False, "--auth auto, and the server listens on loopback only"


@dataclass
class Security:
    settings: SecuritySettings
    listen: str
    port: int
    data_dir: Path
    queue_file: Path  # where the audit log's head and outbox are kept (the queue's file, or a node's own)
    limits: Limits
    audit_folder: Path | None = None  # default: <data dir>/audit
    tokens: TokenStore = field(init=False)
    network: NetworkPolicy = field(init=False)
    rate: RateLimiter = field(init=False)
    audit: AuditLog = field(init=False)
    blocklist: Blocklist | None = field(init=False)
    auth: bool = field(init=False)
    auth_reason: str = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.auth, self.auth_reason = auth_decision(s.auth, self.listen, s.trusted_proxy)
        self.network = NetworkPolicy.build(s.allow_ip, s.trusted_proxy, s.allow_origin, self.listen)
        self.blocklist = Blocklist(list(s.blocklist)) if s.blocklist else None
        self.tokens = TokenStore(self.data_dir / "auth.sqlite3")
        self.rate = RateLimiter()
        self.audit = AuditLog(self.audit_folder or self.data_dir / "audit", self.queue_file, s.audit_retention)
        self.refusals = RefusalTally(self.audit.add)
        self._limits: dict[tuple[str, int | None, int | None], Limits] = {}
        self._task: asyncio.Task[None] | None = None

    def needs_credential(self, headers: Mapping[str, str]) -> bool:
        """Whether this request must carry a token. With `--auth auto` off on loopback, a request that came
        through a proxy nobody declared (it has forwarding headers) still does: it is from another machine."""
        if self.auth:
            return True
        return self.settings.auth == "auto" and any(name in headers for name in FORWARDING_HEADERS)

    def announce(self) -> None:
        """Say at start-up what a network operator must know."""
        if not self.auth and not is_loopback_bind(self.listen):
            log.warning(
                "authentication is off and the server listens on %s: anyone who can reach the port can use it",
                self.listen,
            )
        elif not self.auth and self.settings.trusted_proxy:
            log.warning(
                "authentication is off behind a proxy (--trusted-proxy %s): everyone the proxy serves can use the "
                "server as its admin",
                ", ".join(self.settings.trusted_proxy),
            )
        if self.auth and self.tokens.empty():
            log.warning(
                "authentication is on and no token exists: make one with `zimage tokens create NAME --role admin "
                "--data-dir %s`",
                self.data_dir,
            )

    def public_base(self) -> str:
        """Where clients reach this server, for absolute URLs: --public-url, else the bound address (never
        a client's Host header, which a client chooses)."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        host = f"[{self.listen}]" if ":" in self.listen else self.listen
        return f"http://{host}:{self.port}"

    def identity(self, token: Token | None, address: str) -> Identity:
        if token is None:
            return Identity("", address=address)
        key = (token.name, token.max_pixels, token.max_steps)
        limits = self._limits.get(key)
        if limits is None:
            limits = self.limits.for_token(token.name, pixels=token.max_pixels, steps=token.max_steps)
            self._limits[key] = limits
        return Identity(token.owner, token.role, address, limits, name=token.name)

    # -- lifetime ------------------------------------------------------------------------------------
    def start(self, on_revoked: Callable[[str], Awaitable[None]] | None = None) -> None:
        """Start the audit log's writer; with `on_revoked`, call it for each token revoked (here, by another
        node, or on the command line) within about a second."""
        self.audit.start()
        if on_revoked is not None:
            self._task = asyncio.get_running_loop().create_task(self._maintain(on_revoked))

    async def _maintain(self, on_revoked: Callable[[str], Awaitable[None]]) -> None:
        """Act on tokens revoked elsewhere, and write tokens' last use now and then."""
        while True:
            await asyncio.sleep(REFRESH_S)
            self.refusals.flush_due()
            try:
                for user in await asyncio.to_thread(self.tokens.take_revoked):
                    await on_revoked(user)
                await asyncio.to_thread(self.tokens.flush_use, TOUCH_S)
            except Exception:  # keep maintaining; the next turn tries again
                log.exception("token maintenance failed")

    async def stop_tasks(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def stop(self) -> None:
        self.refusals.flush()
        self.audit.stop()
        with contextlib.suppress(Exception):
            self.tokens.close()
