"""Every Python block in docs/client.md runs as written against a real server (its URL swapped in)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.threaded import threaded_server

DOC = Path(__file__).resolve().parents[1] / "docs" / "client.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


def test_the_page_has_examples() -> None:
    assert len(BLOCKS) >= 5 and all("http://127.0.0.1:8188" in block for block in BLOCKS)


def test_every_example_runs(tmp_path: Path) -> None:
    with threaded_server(tmp_path / "data") as server:
        for index, block in enumerate(BLOCKS):
            code = block.replace("http://127.0.0.1:8188", server.url)
            ran = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
            )
            if ran.returncode != 0:
                pytest.fail(f"example {index + 1} failed:\n{block}\n{ran.stderr}")
    assert (tmp_path / "circle.png").is_file() and (tmp_path / "square.png").is_file()
