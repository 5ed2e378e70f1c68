"""Credentials are never shown: a URL's password is replaced before the URL is printed, logged or answered.

`--queue redis://:PASSWORD@host:6379/0` is how redis-py, Celery and every deployment guide spell a
password; it then travels in argv, in error messages and in the worker's start-up line. Each of those goes
through `redacted` first. (Better still, give the password in ZIMAGE_REDIS_PASSWORD or a file named by
ZIMAGE_REDIS_PASSWORD_FILE: then it is in no URL at all.)
"""

from __future__ import annotations

import re

HIDDEN = "***"
# scheme://[user]:password@ — the password is what lies between the first ':' after the user and the '@'.
_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@:]*:)(?P<password>[^\s/?#@]+)@")


def redacted(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    return _CREDENTIALS.sub(rf"\g<head>{HIDDEN}@", text)
