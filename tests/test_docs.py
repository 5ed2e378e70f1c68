"""The user documentation: the README stays a short guide, the site builds strictly, and neither speaks of
how the project was developed (issue numbers, sessions, the field report)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250

DEVELOPMENT_TALK = re.compile(r"\b(issue|session)s? \d+|field[- ]report", re.IGNORECASE)
# a stylesheet, script or font that a page would fetch from elsewhere (links to other sites are fine)
FETCHED_FROM_THE_WEB = re.compile(r'<(?:script|link)\b[^>]*\b(?:src|href)="(?:https?:)?//[^"]+"[^>]*>', re.IGNORECASE)
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def user_pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def test_the_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move details into docs/"


@pytest.mark.parametrize("page", user_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_speaks_of_development_history(page: Path) -> None:
    found = [
        f"{page.relative_to(ROOT)}:{number}: {match.group(0)!r}"
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        for match in DEVELOPMENT_TALK.finditer(line)
    ]
    assert not found, "user documentation speaks of development history:\n" + "\n".join(found)


def test_the_readmes_relative_links_exist() -> None:
    targets = MARKDOWN_LINK.findall(README.read_text(encoding="utf-8"))
    relative = [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", t)]
    assert relative, "the README links into the docs"
    missing = [t for t in relative if not (ROOT / unquote(t.split("#", 1)[0])).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
    built = subprocess.run([*command, "--site-dir", str(site)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}\n{built.stderr}"
    reference = (site / "reference" / "commands" / "index.html").read_text(encoding="utf-8")
    for name in ("generate", "serve", "worker", "batch", "templates", "tokens", "audit", "models", "nano"):
        assert f"zimage {name}" in reference, f"the command reference lacks zimage {name}"
    assert "--max-pixels" in reference, "the command reference lists each command's options"
    fetched = [
        f"{page.relative_to(site)}: {match.group(0)}"
        for page in site.rglob("*.html")
        for match in FETCHED_FROM_THE_WEB.finditer(page.read_text(encoding="utf-8"))
    ]
    assert not fetched, "the site must render offline (no web fonts, no CDN):\n" + "\n".join(fetched)
