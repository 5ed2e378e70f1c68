"""Smart memory: each component's weights stay on the accelerator as far as they fit, across images.

A component registered here (`Residency.add`) keeps a host copy of every weight, in pinned memory on a
CUDA card, filled once: weights never change, so moving a component out of the card only points its
tensors back at that copy, and bringing it in is one copy from pinned memory. Before a component runs, the
plan (`residency_plan.plan`) says what stays: the card's real free memory, less the activations the call
is expected to need at this input size (measured on its first call at that size, estimated before), is
shared by the least recently used rule, and a component that does not fit whole runs partly resident,
its other blocks copied in one by one, the next on a side stream while the current one computes.

Forward calls trigger it through hooks; the VAE and the ControlNet, which are not called through their
`forward`, are brought in with `holding`, which also keeps a component on the card for a whole block (a
LoRA patch changes the resident weights in place, so the transformer must not move while it is applied).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from zimage_serve.engine.activations import Activation
from zimage_serve.engine.devices import memory_fraction
from zimage_serve.engine.residency_plan import Footprint, NoRoom, Residents, plan

log = logging.getLogger(__name__)

GIB = 2**30
SAFETY_MARGIN = 512 * 2**20  # left free on the card: the allocator's rounding and fragmentation
PINNED_SHARE = 0.6  # of the machine's memory, at most, in pinned host copies
_MANAGED = "_zimage_residency"


class Budget(Protocol):
    """The card's memory as the plan sees it."""

    def room(self, held: int) -> int:
        """Bytes the managed weights may take on the card in all, `held` of them being there now."""

    def watch(self) -> None:
        """Start measuring the memory a call takes above what is allocated now."""

    def peak(self) -> int | None:
        """The most taken above the start since `watch`, or None where it cannot be measured."""

    def activations(self, expected: int) -> int:
        """The memory to set aside for a call whose activations are `expected` to take that much."""


@dataclass
class FixedBudget:
    """A card of `size` bytes on which every call takes `calls_take` bytes beside the weights (None: as
    estimated): the CPU's stand-in for a card, in tests and the benchmarks' CPU runs."""

    size: int
    calls_take: int | None = None

    def room(self, held: int) -> int:
        return self.size

    def activations(self, expected: int) -> int:
        return expected if self.calls_take is None else self.calls_take

    def watch(self) -> None:
        pass

    def peak(self) -> int | None:
        return None


@dataclass
class CudaBudget:
    """A CUDA card's real free memory, within the process's memory fraction (and `limit`, if given), less
    what is not weights."""

    device: torch.device
    limit: int | None = None
    margin: int = SAFETY_MARGIN
    _base: int = 0

    def room(self, held: int) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        limit = min(int(total * memory_fraction(self.device)), free + reserved)
        if self.limit is not None:
            limit = min(limit, self.limit)
        others = torch.cuda.memory_allocated(self.device) - held  # latents, embeddings, caches: not ours to move
        return limit - others - self.margin

    def watch(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int | None:
        return max(0, torch.cuda.max_memory_allocated(self.device) - self._base)

    def activations(self, expected: int) -> int:
        return expected


class _Slot:
    """One weight tensor of a component (a parameter or a buffer, wherever it is registered) and its host copy."""

    __slots__ = ("buffers", "host", "parameter")

    def __init__(self, host: torch.Tensor, parameter: torch.nn.Parameter | None, buffers: list[tuple[Any, str]]):
        self.host = host
        self.parameter = parameter
        self.buffers = buffers

    def put(self, tensor: torch.Tensor) -> None:
        if self.parameter is not None:
            self.parameter.data = tensor
        for module, name in self.buffers:
            module._buffers[name] = tensor

    @property
    def size(self) -> int:
        return self.host.numel() * self.host.element_size()


@dataclass
class _Part:
    """The base or one block: its slots, and its tensors on the card while it is there."""

    slots: list[_Slot]
    on_card: list[torch.Tensor] | None = None
    arriving: Any = None  # the CUDA event of a copy under way on the side stream
    computed: Any = None  # the CUDA event recorded after its last call, while streamed

    @property
    def size(self) -> int:
        return sum(slot.size for slot in self.slots)


@dataclass
class _Component:
    name: str
    base: _Part
    blocks: list[_Part]
    footprint: Footprint
    activation: Activation
    resident: int | None = None  # base and the first `resident` blocks are on the card
    last_used: int = -1
    in_use: int = 0  # held or running: `free` and `make_room` leave it alone, plans as `inside` and `exact` say
    refused: int = 0  # calls whose plan raised: their after-call hook releases nothing
    inside: int = 0  # holds of it to run inside other components' calls (it may stream: others may shrink it)
    exact: int = 0  # holds that keep it exactly as it is (its weights patched where they are)
    calls: int = 0  # its forward calls running
    peaks: dict[int | None, int] = field(default_factory=dict)
    slots: dict[Any, _Slot] = field(default_factory=dict)  # by parameter, and by (module, name) for buffers

    @property
    def streaming(self) -> bool:
        """Part of it is on the card and the rest streams in block by block when it runs."""
        return self.resident is not None and self.resident < len(self.blocks)


class Residency:
    """The components sharing one accelerator. Thread-safe; the worker runs one prompt at a time with it."""

    def __init__(self, device: torch.device, budget: Budget | None = None, prefetch: bool = True) -> None:
        self.device = device
        if budget is None:  # off CUDA, a card without limit (smart memory is for CUDA cards: tests give a budget)
            budget = CudaBudget(device) if device.type == "cuda" else FixedBudget(2**62)
        self.budget = budget
        self._cuda = device.type == "cuda"
        self._prefetch = prefetch and self._cuda
        self._side: Any = None  # the copy stream, made on first use (not in a process that never runs a model)
        self._lock = threading.RLock()
        self._clock = itertools.count()
        self._names = itertools.count(1)
        # Weak: a component the executor's cache lets go of (POST /free, eviction) must not live on here.
        self._modules: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self._measuring: tuple[_Component, int | None] | None = None
        self.moved_in = 0  # bytes copied to the card, for the benchmarks
        self._pinned = 0
        self._pinnable = int(physical_memory() * PINNED_SHARE)
        self._warned = False

    # -- registration ------------------------------------------------------------------------------
    def add(
        self, module: torch.nn.Module, name: str, activation: Activation | None = None, one_pass: bool = False
    ) -> torch.nn.Module:
        """Manage `module` (loaded in host memory): its weights go to host copies (pinned on CUDA) and come
        onto the card when it runs. Its blocks are its largest list of submodules."""
        if getattr(module, _MANAGED, None) is not None:
            return module
        blocks = _blocks_of(module)
        with self._lock:
            pinned_before = self._pinned
            slots = self._slots(module)
            weakref.finalize(module, self._unpinned, self._pinned - pinned_before)
        owned = [_owned(slots, block) for block in blocks]
        owners = collections.Counter(id(slot) for block_slots in owned for slot in block_slots)
        in_blocks = {id(m) for block in blocks for m in block.modules()}
        outside = [m for m in module.modules() if id(m) not in in_blocks]
        for slot in _owned(slots, *outside, recurse=False):
            owners[id(slot)] += 2  # also used outside the blocks: part of the base
        # A tensor shared between blocks, or with the base (tied weights), belongs to the base: it must be
        # on the card whenever any of its users runs.
        parts = [_Part([slot for slot in block_slots if owners[id(slot)] == 1]) for block_slots in owned]
        base = _Part([slot for slot in set(slots.values()) if owners[id(slot)] != 1])
        footprint = Footprint(f"{name}#{next(self._names)}", base.size, tuple(p.size for p in parts), one_pass)
        estimate = activation if activation is not None else _default_activation(footprint.total)
        component = _Component(footprint.name, base, parts, footprint, estimate, slots=slots)
        setattr(module, _MANAGED, (self, component))
        module.register_forward_pre_hook(_compiler_disabled(self._before_call), with_kwargs=True)
        module.register_forward_hook(_compiler_disabled(self._after_call), always_call=True)
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(_compiler_disabled(self._stream_in(component, index)))
            block.register_forward_hook(_compiler_disabled(self._stream_out(component, index)), always_call=True)
        with self._lock:
            self._modules.add(module)
        log.info(
            "%s: %.2f GiB of weights in %d blocks, kept on %s as far as they fit",
            name, footprint.total / GIB, len(blocks), self.device,
        )  # fmt: skip
        return module

    def _slots(self, module: torch.nn.Module) -> dict[Any, _Slot]:
        """Every tensor once (a tied weight is one slot), each moved to its host copy at once, so that a
        component never has two copies in host memory. Keyed by parameter, and by (module, name) for buffers."""
        slots: dict[Any, _Slot] = {}
        buffers: dict[int, _Slot] = {}
        for owner in module.modules():
            for parameter in owner._parameters.values():
                if parameter is not None and id(parameter) not in slots:
                    slot = slots[id(parameter)] = _Slot(self._host(parameter.data), parameter, [])
                    slot.put(slot.host)
            for name, buffer in owner._buffers.items():
                if buffer is None:
                    continue
                shared = buffers.get(id(buffer))
                if shared is None:
                    shared = buffers[id(buffer)] = _Slot(self._host(buffer), None, [])
                shared.buffers.append((owner, name))
                slots[(id(owner), name)] = shared
        for slot in buffers.values():
            slot.put(slot.host)
        return slots

    def _unpinned(self, size: int) -> None:
        """A component's module was collected: its pinned host copies went with it, and PyTorch's cache of
        pinned memory gives their pages back."""
        with self._lock:
            self._pinned = max(0, self._pinned - size)
        if size:
            empty = getattr(torch._C, "_host_emptyCache", None)
            if empty is not None:
                empty()

    def _host(self, tensor: torch.Tensor) -> torch.Tensor:
        """The host copy: pinned while pinned copies stay within PINNED_SHARE of the machine's memory (pinned
        pages cannot be swapped out, and a 6B model is 20 GB of them); pageable after that, slower to copy."""
        host = tensor.detach().to("cpu")
        if not self._cuda:
            return host
        size = _pinned_size(host.numel() * host.element_size())
        if self._pinned + size <= self._pinnable:
            try:
                pinned = host.pin_memory()
            except RuntimeError as exc:  # the driver refused: what is left stays pageable
                log.warning("host copies stay pageable from here (pinning failed: %s)", exc)
                self._pinnable = self._pinned
            else:
                self._pinned += size
                return pinned
        if not self._warned:
            self._warned = True
            log.warning(
                "pinned host copies reached %.1f GiB, %.0f%% of this machine's memory: the rest stays pageable, "
                "and moves to the card take longer", self._pinned / GIB, PINNED_SHARE * 100,
            )  # fmt: skip
        return host

    # -- the plan --------------------------------------------------------------------------------
    def need(self, module: torch.nn.Module, key: int | None = None, hold: bool = False, measure: bool = True) -> None:
        """Make room for `module` to run on an input of `key` elements, and bring in what fits of it; with
        `hold`, it is in use until `release`. `measure`: what is allocated until then is the call's own (a
        forward, a VAE's encode or decode), to be measured at a size not measured yet."""
        component = _component(module, self)
        if component is None:
            return
        with self._lock:
            self._settle_measurement()
            component.last_used = next(self._clock)
            components = self._components()
            held = sum(c.footprint.held(c.resident) for c in components)
            expected, measured = self._expected(component, key)
            around = [c for c in components if c.in_use and c is not component]
            inside = [c for c in around if c.inside and not c.exact and not c.calls]
            for other in inside:  # they run inside this call (a ControlNet): activations, two streamed blocks
                expected += self._expected(other, key)[0] + other.footprint.needs(0) - other.footprint.held(0)
            room = self.budget.room(held) - self.budget.activations(expected)
            if component.resident != len(component.blocks) or held > room:  # else all fits as it is: no plan
                footprints = {c.name: c.footprint for c in components}
                now = Residents({c.name: c.resident for c in components}, {c.name: c.last_used for c in components})
                fixed_others = frozenset(c.name for c in around if c not in inside)
                streaming = frozenset(c.name for c in inside)
                # Held as it is, its weights may be patched where they are (a LoRA): they stay exactly there.
                fixed = component.resident if component.exact else None
                try:
                    after = plan(component.name, footprints, now, room, fixed_others, fixed, streaming)
                except NoRoom:
                    if measured:
                        raise
                    # Only estimated: tried with all the card can give, and measured (the estimates are generous).
                    room = self.budget.room(held)
                    after = plan(component.name, footprints, now, room, fixed_others, fixed, streaming)
                for other in components:
                    if other is not component:
                        self._shrink(other, after[other.name])
                self._set(component, after[component.name])
            if hold:
                component.in_use += 1
            if measure and key is not None and key not in component.peaks and self._measuring is None:
                self.budget.watch()
                self._measuring = (component, key)

    def release(self, module: torch.nn.Module, failed: bool = False) -> None:
        """The end of a `need(..., hold=True)`; `failed`: the call raised, and what it took is no measure."""
        component = _component(module, self)
        if component is None:
            return
        with self._lock:
            component.in_use = max(0, component.in_use - 1)
            if failed and self._measuring is not None and self._measuring[0] is component:
                self._measuring = None
            if not component.in_use:
                self._settle_measurement()
                if component.streaming:  # a stopped run can leave streamed blocks behind
                    for part in component.blocks[component.resident or 0 :]:
                        self._drop(part)

    @contextlib.contextmanager
    def holding(
        self, module: torch.nn.Module, key: int | None = None, inside: bool = False, exact: bool = False
    ) -> Iterator[None]:
        """`module` on the card (as far as it fits) for the whole block, for calls on `key` elements.
        `inside`: it runs inside other components' calls (a ControlNet in the transformer's): their plans set
        its activations and two streamed blocks aside, and may make it stream more of its blocks. `exact`:
        its weights are patched where they are (a LoRA), so nothing of it moves until the block ends."""
        component = _component(module, self)
        if component is None:
            yield
            return
        # A hold for other work (a LoRA's patching, a ControlNet's part in another call) measures nothing.
        self.need(module, key, hold=True, measure=not inside and not exact)
        self._count(component, inside, exact, 1)
        try:
            yield
        except BaseException:
            self._count(component, inside, exact, -1)
            self.release(module, failed=True)
            raise
        self._count(component, inside, exact, -1)
        self.release(module)

    def _count(self, component: _Component, inside: bool, exact: bool, step: int) -> None:
        with self._lock:
            component.inside += step if inside else 0
            component.exact += step if exact else 0

    def make_room(self, size: int) -> None:
        """Room on the card for `size` bytes it does not manage (an upscaler and its tiles, for one call),
        taken from the least recently used components that are not in use; as much as can be had."""
        with self._lock:
            components = self._components()
            held = sum(c.footprint.held(c.resident) for c in components)
            room = self.budget.room(held)
            if held + size <= room:
                return
            guest = Footprint("(room)", size)
            footprints = {c.name: c.footprint for c in components} | {guest.name: guest}
            now = Residents(
                {c.name: c.resident for c in components}, {c.name: c.last_used for c in components}
            )  # fmt: skip
            in_use = frozenset(c.name for c in components if c.in_use)
            try:
                after = plan(guest.name, footprints, now, room, in_use)
            except NoRoom:  # everything that may move goes: the caller's own retries (smaller tiles) do the rest
                after = {c.name: None for c in components if not c.in_use}
            for component in components:
                if component.name in after:
                    self._shrink(component, after[component.name])

    def free(self) -> None:
        """Move every component out of the card (POST /free, a shutdown)."""
        with self._lock:
            for component in self._components():
                if not component.in_use:
                    self._shrink(component, None)

    def resident(self) -> dict[str, float]:
        """GiB on the card per component."""
        with self._lock:
            return {c.name: c.footprint.held(c.resident) / GIB for c in self._components()}

    def _components(self) -> list[_Component]:
        found = []
        for module in list(self._modules):
            managed = getattr(module, _MANAGED, None)
            if managed is not None:
                found.append(managed[1])
        return found

    def _expected(self, component: _Component, key: int | None) -> tuple[int, bool]:
        """The activations a call is expected to take, and whether that was measured: as measured at this size,
        else scaled from the largest size measured, else the component's estimate."""
        if key in component.peaks:
            return component.peaks[key], True
        measured = [(k, v) for k, v in component.peaks.items() if k is not None]
        if key is None and component.peaks:
            return max(component.peaks.values()), True
        if key is not None and measured:
            size, peak = max(measured)
            return max(peak, peak * key // max(size, 1)), True
        return component.activation(key), False

    def _settle_measurement(self) -> None:
        if self._measuring is None:
            return
        component, key = self._measuring
        self._measuring = None
        peak = self.budget.peak()
        if peak is not None:
            streamed = component.footprint.needs(component.resident or 0) - component.footprint.held(component.resident)
            component.peaks[key] = max(0, peak - streamed) if component.streaming else peak

    # -- moves -----------------------------------------------------------------------------------
    def _shrink(self, component: _Component, resident: int | None) -> None:
        """Move blocks out from the last (streamed ones left over too), then the base when `resident` is None."""
        if component.resident is None:
            return
        for index in range(len(component.blocks) - 1, (resident or 0) - 1, -1):
            self._drop(component.blocks[index])
        if resident is None:
            self._drop(component.base)
        component.resident = resident

    def _set(self, component: _Component, resident: int | None) -> None:
        if resident is None or (component.resident is not None and resident <= component.resident):
            self._shrink(component, resident)
            return
        if component.resident is None:
            self._load(component.base)
        for index, part in enumerate(component.blocks):
            if index < resident:
                self._load(part)
            else:  # streamed blocks left over from an earlier call, or on their way
                self._drop(part)
        component.resident = resident

    def _load(self, part: _Part) -> None:
        if part.on_card is not None:
            self._arrived(part)
            return
        tensors = [slot.host.to(self.device, non_blocking=self._cuda, copy=True) for slot in part.slots]
        for slot, tensor in zip(part.slots, tensors, strict=True):
            slot.put(tensor)
        part.on_card = tensors
        self.moved_in += part.size

    def _drop(self, part: _Part) -> None:
        if part.on_card is None:
            return
        self._arrived(part)
        for slot in part.slots:
            slot.put(slot.host)
        part.on_card = None

    def _arrived(self, part: _Part) -> None:
        """Wait (on the compute stream, not the host) for a copy made on the side stream."""
        if part.arriving is not None:
            torch.cuda.current_stream(self.device).wait_event(part.arriving)
            part.arriving = None

    def _prefetch_part(self, part: _Part) -> None:
        """Copy a streamed block in on the side stream while the current one computes."""
        if part.on_card is not None or not self._prefetch:
            return
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._side):
            tensors = [slot.host.to(self.device, non_blocking=True, copy=True) for slot in part.slots]
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self._side)
        for tensor in tensors:
            tensor.record_stream(compute)  # freed only once the compute stream is done with it
        for slot, tensor in zip(part.slots, tensors, strict=True):
            slot.put(tensor)
        part.on_card, part.arriving = tensors, event
        self.moved_in += part.size

    # -- hooks -----------------------------------------------------------------------------------
    def _before_call(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        component = _component(module, self)
        try:
            self.need(module, _elements(args, kwargs), hold=True)
        except Exception:  # (torch runs the after-call hooks of a call that raised an Exception, not others)
            if component is not None:
                component.refused += 1  # torch still calls the after-call hook, which must release nothing
            raise
        if component is not None:
            with self._lock:
                component.calls += 1
        if component is not None and component.streaming and component.resident is not None:
            with self._lock:  # the first streamed block comes in while the resident ones compute
                self._prefetch_part(component.blocks[component.resident])

    def _after_call(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        component = _component(module, self)
        if component is None:
            return
        if component.refused:
            component.refused -= 1
            return
        with self._lock:
            component.calls = max(0, component.calls - 1)
        if component.streaming:
            with self._lock:  # a stopped call can leave streamed blocks behind: none stays between calls
                for part in component.blocks[component.resident or 0 :]:
                    self._drop(part)
        self.release(module, failed=output is None)  # None: the call raised (always_call hooks still run)

    def _stream_in(self, component: _Component, index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if not component.streaming or component.resident is None or index < component.resident:
                return
            with self._lock:
                self._load(component.blocks[index])
                if self._prefetch and index + 1 < len(component.blocks):
                    # The host waits for the block before this one to be computed: the memory it frees is
                    # then free on the card's timeline too, and no more than two blocks are ever in flight.
                    previous = component.blocks[index - 1].computed if index > 0 else None
                    if previous is not None:
                        previous.synchronize()
                    self._prefetch_part(component.blocks[index + 1])

        return hook

    def _stream_out(self, component: _Component, index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not component.streaming or component.resident is None or index < component.resident:
                return
            with self._lock:
                part = component.blocks[index]
                if self._cuda:
                    part.computed = torch.cuda.Event()  # type: ignore[no-untyped-call]
                    part.computed.record(torch.cuda.current_stream(self.device))
                self._drop(part)

        return hook


def _pinned_size(size: int) -> int:
    """What pinning `size` bytes takes: PyTorch's pinned-memory cache hands out powers of two."""
    return 1 << max(size - 1, 0).bit_length()


def physical_memory() -> int:
    """The machine's memory in bytes (a large number where the system cannot say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 2**62


def _component(module: torch.nn.Module, residency: Residency | None = None) -> _Component | None:
    managed = getattr(module, _MANAGED, None)
    if managed is None or (residency is not None and managed[0] is not residency):
        return None
    component: _Component = managed[1]
    return component


def managed_by(module: torch.nn.Module) -> Residency | None:
    managed = getattr(module, _MANAGED, None)
    return None if managed is None else managed[0]


@contextlib.contextmanager
def holding(
    module: torch.nn.Module, key: int | None = None, inside: bool = False, exact: bool = False
) -> Iterator[None]:
    """`Residency.holding` for a managed module; nothing for one that lives on its device."""
    residency = managed_by(module)
    if residency is None:
        yield
        return
    with residency.holding(module, key, inside, exact):
        yield


def original_of(root: torch.nn.Module, module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """For a weight of a managed component (`module.<name>`, `module` inside `root`) whose tensor is now a
    copy on the card: its host copy, which nothing changes while the copy is there (a LoRA restores from it
    rather than keep a second copy on the card). None otherwise."""
    managed = getattr(root, _MANAGED, None)
    if managed is None:
        return None
    component: _Component = managed[1]
    parameter = module._parameters.get(name)
    slot = component.slots.get(id(parameter) if parameter is not None else (id(module), name))
    current = parameter if parameter is not None else module._buffers.get(name)
    if slot is None or current is None or current.data_ptr() == slot.host.data_ptr():
        return None
    return slot.host


def copies_done(module: torch.nn.Module) -> None:
    """Wait until every copy from a managed component's host copies has been made: before anything writes
    to them (a LoRA patching or restoring streamed blocks), as copies from pinned memory run asynchronously."""
    residency = managed_by(module)
    if residency is not None and residency.device.type == "cuda":
        torch.cuda.synchronize(residency.device)


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its residency's device (its weights may be in host memory between calls),
    else where its weights are."""
    residency = managed_by(module)
    if residency is not None:
        return residency.device
    return next(module.parameters()).device


def _blocks_of(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The module's largest list of submodules by weight (a transformer's or text encoder's layers)."""
    lists = [child for child in module.modules() if isinstance(child, torch.nn.ModuleList) and len(child) > 1]
    if not lists:
        return []
    largest = max(lists, key=lambda blocks: sum(p.numel() * p.element_size() for p in blocks.parameters()))
    return list(largest)


def _owned(slots: dict[Any, _Slot], *modules: torch.nn.Module, recurse: bool = True) -> list[_Slot]:
    """The slots of the tensors registered in `modules` (and their submodules, with `recurse`)."""
    found: dict[int, _Slot] = {}
    owners = [m for module in modules for m in module.modules()] if recurse else list(modules)
    for owner in owners:
        keys: list[Any] = [id(p) for p in owner._parameters.values() if p is not None]
        keys += [(id(owner), name) for name, b in owner._buffers.items() if b is not None]
        for key in keys:
            slot = slots.get(key)
            if slot is not None:
                found[id(slot)] = slot
    return list(found.values())


def _elements(args: Any, kwargs: dict[str, Any]) -> int | None:
    """The size of a call's input: the elements of its first tensor argument (lists of tensors summed)."""
    for value in itertools.chain(args, kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.numel()
        if isinstance(value, list | tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            return int(sum(v.numel() for v in value))
    return None


def _default_activation(weights: int) -> Activation:
    """Before anything was measured: a tenth of the weights, the same at every size."""
    return lambda key: weights // 10


def _compiler_disabled(hook: Callable[..., Any]) -> Callable[..., Any]:
    disable: Callable[[Callable[..., Any]], Callable[..., Any]] = torch.compiler.disable
    return disable(hook)
