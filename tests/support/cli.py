"""The `zimage` command, in this process (for the many cases) or as a real process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zimage_serve.cli import main


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `zimage ARGS` run in this process."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def zimage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`zimage ARGS` as a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "zimage_serve.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
