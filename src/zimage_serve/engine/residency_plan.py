"""Which weights stay on the accelerator when a component is about to run: the decision alone, on sizes.

Each component is a `Footprint`: a base that must be on the card whenever it runs, and blocks, in the
order it calls them, each of which may instead stay in host memory and be streamed in for its call. A
component is resident as a prefix: its base and its first `k` blocks (`None`: nothing of it).

When a component is needed, `plan` gives the residency of every component afterwards:
- what fits stays: nothing moves while the needed component and its activations fit beside the others;
- otherwise the least recently used components that are not in use give up room, their last blocks
  first and their base last, just as much as the needed component lacks (weights never change, so
  giving up room copies nothing back: their host copies are kept);
- a component too big for what is left runs partly resident: as many blocks as fit stay, the rest are
  streamed in one by one (room for two of them is kept: the block running and the next one, on its way);
- a one-pass component (a text encoder: one call per prompt) evicts nothing that the others still use:
  streaming the part it lacks moves the same bytes as loading it, and an eviction would be paid again when
  the evicted component comes back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from zimage_serve.errors import DeviceError

STREAMED_AT_ONCE = 2  # the block running and the next one, copied in meanwhile


@dataclass(frozen=True)
class Footprint:
    """A component's weights in bytes: the part always on the card while it runs, and its blocks."""

    name: str
    base: int
    blocks: tuple[int, ...] = ()
    one_pass: bool = False

    @property
    def total(self) -> int:
        return self.base + sum(self.blocks)

    def held(self, blocks: int | None) -> int:
        """Bytes on the card with its base and first `blocks` blocks resident."""
        return 0 if blocks is None else self.base + sum(self.blocks[:blocks])

    def needs(self, blocks: int) -> int:
        """Bytes on the card while it runs with `blocks` blocks resident and the others streamed."""
        streamed = sorted(self.blocks[blocks:], reverse=True)[:STREAMED_AT_ONCE]
        return self.held(blocks) + sum(streamed)


@dataclass(frozen=True)
class Residents:
    """What is on the card now: per component, its resident prefix, and when it was last needed."""

    blocks: Mapping[str, int | None]
    last_used: Mapping[str, int]


class NoRoom(DeviceError):
    """Even with everything else moved out, the component's base does not fit beside its activations."""


def plan(
    need: str,
    footprints: Mapping[str, Footprint],
    now: Residents,
    room: int,
    in_use: frozenset[str] = frozenset(),
    fixed: int | None = None,
    streaming: frozenset[str] = frozenset(),
) -> dict[str, int | None]:
    """Every component's resident blocks once `need` may run, within `room` bytes of weights (the card's
    free memory for weights, with the activations set aside). `in_use` components (running around this
    one, or held as they are) keep what they have; `streaming` ones (held, and able to stream blocks, as a
    ControlNet inside the transformer's calls) may give up blocks but keep their base. With `fixed`, the
    needed component keeps exactly that many blocks (it is held, and its weights may be patched where they
    are): only the others make room for it."""
    wanted = footprints[need]
    after = {name: now.blocks.get(name) for name in footprints}
    after[need] = None

    def others() -> int:
        return sum(footprints[name].held(blocks) for name, blocks in after.items() if name != need)

    full = len(wanted.blocks)
    least = fixed if fixed is not None else 0 if wanted.one_pass else full  # what the others must make room for
    goal = wanted.needs(least)
    if others() + goal > room:
        _give_up(after, footprints, now, need, in_use, streaming, goal + others() - room)
    left = room - others()
    candidates = [fixed] if fixed is not None else range(full + 1)
    resident = max((k for k in candidates if wanted.needs(k) <= left), default=None)
    if resident is None:
        raise NoRoom(
            f"{need} needs {_size(wanted.needs(fixed or 0))} on the card to run (its fixed part, the blocks it "
            f"keeps and two streamed ones) but only {_size(max(left, 0))} is left for weights"
        )
    after[need] = resident
    return after


def _give_up(
    after: dict[str, int | None],
    footprints: Mapping[str, Footprint],
    now: Residents,
    need: str,
    in_use: frozenset[str],
    streaming: frozenset[str],
    lacking: int,
) -> None:
    """Move out `lacking` bytes from the least recently used components, last blocks first (base last, and
    never a streaming component's)."""
    candidates = sorted(
        (name for name, blocks in after.items() if name != need and name not in in_use and blocks is not None),
        key=lambda name: now.last_used.get(name, -1),
    )
    for name in candidates:
        footprint = footprints[name]
        while lacking > 0 and after[name] is not None:
            blocks = after[name]
            assert blocks is not None
            if blocks > 0:
                lacking -= footprint.blocks[blocks - 1]
                after[name] = blocks - 1
            elif name in streaming:
                break
            else:
                lacking -= footprint.base
                after[name] = None
        if lacking <= 0:
            return


def _size(size: int) -> str:
    if size >= 2**30:
        return f"{size / 2**30:.2f} GiB"
    return f"{size / 2**20:.1f} MiB"
