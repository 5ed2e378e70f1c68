"""Tokens written straight into a data dir's token store, as `zimage tokens create` would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zimage_serve.security.tokens import TokenStore


def make_tokens(data: Path, **extra: dict[str, Any]) -> dict[str, str]:
    """Tokens by role: "user" (alice), "other" (bob), "admin" (root), "revoked" (carol's, revoked) and
    "bad" (well formed, unknown). `extra` gives alice's or bob's limits (`alice={"rpm": 5}`)."""
    store = TokenStore(data / "auth.sqlite3")
    try:
        tokens = {
            "user": store.create("alice", "user", **extra.get("alice", {}))[0],
            "other": store.create("bob", "user", **extra.get("bob", {}))[0],
            "admin": store.create("root", "admin")[0],
            "revoked": store.create("carol", "user")[0],
            "bad": "zis_" + "x" * 43,
        }
        store.revoke("carol")
    finally:
        store.close()
    return tokens
