"""requirements.lock agrees with pyproject.toml: every requirement (the extras' and the build's too) is
pinned there at a version its range admits, with hashes, and nothing is pinned for a requirement that
pyproject.toml no longer has. Fails until `make lock` is run after a change to the dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = (ROOT / "requirements.lock").read_text()
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.M)


def requirements() -> list[Requirement]:
    texts = list(PROJECT["project"]["dependencies"])
    for extra in PROJECT["project"]["optional-dependencies"].values():
        texts += extra
    texts += PROJECT["build-system"]["requires"]
    return [Requirement(text) for text in texts]


def entries() -> dict[str, str]:
    """Each locked package's whole entry (its pin, hashes and "via" notes), by canonical name."""
    found: dict[str, str] = {}
    starts = list(PIN.finditer(LOCK))
    for match, after in zip(starts, [*starts[1:], None], strict=True):
        found[canonicalize_name(match.group(1))] = LOCK[match.start() : after.start() if after else len(LOCK)]
    return found


def locked() -> dict[str, Version]:
    return {canonicalize_name(m.group(1)): Version(m.group(2)) for m in PIN.finditer(LOCK)}


@pytest.mark.parametrize("requirement", requirements(), ids=str)
def test_every_requirement_is_pinned_within_its_range(requirement: Requirement) -> None:
    if requirement.marker is not None and not requirement.marker.evaluate():
        pytest.skip(f"{requirement}: not for this platform")
    name = canonicalize_name(requirement.name)
    pinned = locked()
    assert name in pinned, f"{requirement.name} is in pyproject.toml but not in requirements.lock: run make lock"
    assert requirement.specifier.contains(pinned[name], prereleases=True), (
        f"requirements.lock pins {requirement.name}=={pinned[name]}, outside pyproject.toml's {requirement.specifier}:"
        " run make lock"
    )


def test_nothing_is_locked_for_a_requirement_pyproject_no_longer_has() -> None:
    direct = {canonicalize_name(r.name) for r in requirements()}
    stale = [
        name for name, entry in entries().items() if "zimage-serve (pyproject.toml)" in entry and name not in direct
    ]
    assert not stale, f"requirements.lock pins {stale} for pyproject.toml, which no longer asks for them: run make lock"


def test_every_pin_has_hashes_and_the_held_versions_hold() -> None:
    missing = [name for name, entry in entries().items() if "--hash=sha256:" not in entry]
    assert not missing, f"pinned without a hash: {missing}"
    pinned = locked()
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            held = Requirement(line)
            assert held.specifier.contains(pinned[canonicalize_name(held.name)]), f"the lock breaks {line}"
