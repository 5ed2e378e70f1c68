"""Smart memory: the plan's decisions against a fake card, and the moves on real modules.

The plan is checked on sizes alone (what stays, what moves out and in which order, what runs partly
resident). The moves run on the CPU, which stands for the card here: a weight "on the card" is a copy
of its host tensor, so the tests can see which tensors are the host copies and which are not."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from zimage_serve.engine.devices import usable_memory
from zimage_serve.engine.lora import LoraPatch, LoraWeights, patched
from zimage_serve.engine.residency import (
    CudaBudget,
    FixedBudget,
    Residency,
    _Component,
    execution_device,
    holding,
)
from zimage_serve.engine.residency_plan import Footprint, NoRoom, Residents, plan

MB = 1_000_000
CPU = torch.device("cpu")


def card(**blocks: int | None) -> Residents:
    """What is on the card, the components listed from least to most recently used."""
    return Residents(blocks, {name: order for order, name in enumerate(blocks)})


# -- the plan ------------------------------------------------------------------------------------------

TEXT = Footprint("text", 2 * MB, (1 * MB,) * 6, one_pass=True)  # 8 MB
DIT = Footprint("dit", 2 * MB, (1 * MB,) * 10)  # 12 MB
VAE = Footprint("vae", 1 * MB)
ALL = {f.name: f for f in (TEXT, DIT, VAE)}


def test_what_fits_stays_and_nothing_moves() -> None:
    after = plan("dit", ALL, card(text=6, vae=0, dit=10), room=21 * MB)
    assert after == {"text": 6, "dit": 10, "vae": 0}


def test_the_least_recently_used_gives_up_just_the_blocks_that_are_lacking_last_ones_first() -> None:
    # 8 + 1 + 12 = 21 MB wanted in 18: the text encoder (used longest ago) gives 3 of its last blocks.
    after = plan("dit", ALL, card(text=6, vae=0, dit=None), room=18 * MB)
    assert after == {"text": 3, "vae": 0, "dit": 10}


def test_a_component_is_moved_out_whole_base_last_before_the_next_least_recent_one_gives_anything() -> None:
    after = plan("dit", ALL, card(text=6, vae=0, dit=None), room=13 * MB)
    assert after == {"text": None, "vae": 0, "dit": 10}
    after = plan("dit", ALL, card(vae=0, text=6, dit=None), room=15 * MB)  # now the VAE is the older one
    assert after == {"vae": None, "text": 1, "dit": 10}


def test_a_component_in_use_keeps_what_it_has() -> None:
    control = Footprint("control", 1 * MB, (1 * MB,) * 2)
    footprints = {**ALL, "control": control}
    after = plan("dit", footprints, card(control=2, text=6, dit=None), 15 * MB, in_use=frozenset({"control"}))
    assert after == {"control": 2, "text": None, "vae": None, "dit": 10}  # the text encoder went instead


def test_a_component_too_big_for_the_card_runs_partly_resident_with_room_for_two_streamed_blocks() -> None:
    after = plan("dit", ALL, card(text=6, vae=0, dit=None), room=9 * MB)
    # Everything else moved out; 2 MB base + k blocks + 2 streamed blocks <= 9 MB: k = 5.
    assert after == {"text": None, "vae": None, "dit": 5}
    assert DIT.needs(5) == 9 * MB


def test_a_one_pass_component_streams_what_does_not_fit_rather_than_moving_others_out() -> None:
    # 12 MB of transformer on a 16 MB card: the text encoder runs in the 4 MB left, two of its blocks
    # streamed, rather than pushing the transformer out (which would come back for the next image).
    after = plan("text", ALL, card(dit=10, text=None), room=16 * MB)
    assert after == {"dit": 10, "vae": None, "text": 0}
    # Only when even its base and two streamed blocks do not fit does it take room from the others.
    after = plan("text", ALL, card(dit=10, text=None), room=14 * MB)
    assert after == {"dit": 8, "vae": None, "text": 0}
    # And with the room free, all of it stays, to be used again by the next prompt.
    assert plan("text", ALL, card(dit=None, text=None), room=16 * MB)["text"] == 6


def test_a_component_whose_base_cannot_fit_is_refused_with_the_sizes() -> None:
    with pytest.raises(NoRoom, match=r"dit needs 3.8 MiB .* but only 2.9 MiB is left"):
        plan("dit", ALL, card(text=6, vae=0, dit=None), room=3 * MB)


def test_a_component_resident_for_a_small_image_shrinks_when_a_larger_one_leaves_less_room() -> None:
    assert plan("dit", ALL, card(dit=10), room=12 * MB)["dit"] == 10
    assert plan("dit", ALL, card(dit=10), room=10 * MB)["dit"] == 6


# -- the moves -----------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.register_buffer("gain", torch.rand(width) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x)) * self.gain


class Toy(nn.Module):
    """A base (embedding, output) and six blocks, the last one tied to the first one's weight."""

    def __init__(self, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(6))
        self.blocks[5].linear.weight = self.blocks[0].linear.weight
        self.out = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.to(execution_device(self)))
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def weights(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def component(residency: Residency, module: nn.Module) -> _Component:
    managed = module._zimage_residency
    assert managed[0] is residency
    found: _Component = managed[1]
    return found


def on_card(residency: Residency, module: nn.Module) -> set[str]:
    """The names of the module's tensors that are not their host copies."""
    managed = component(residency, module)
    hosts = {slot.host.data_ptr() for part in [managed.base, *managed.blocks] for slot in part.slots}
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {name for name, tensor in tensors if tensor.data_ptr() not in hosts}


def test_a_managed_module_computes_the_same_and_keeps_host_copies_filled_once() -> None:
    reference, managed = Toy(), Toy()
    x = torch.randn(3, 8)
    expected = reference(x)
    residency = Residency(CPU, FixedBudget(10 * MB, calls_take=0))
    residency.add(managed, "toy")
    assert on_card(residency, managed) == set()  # nothing brought in before it runs
    assert torch.equal(managed(x), expected)
    assert len(on_card(residency, managed)) == len(list(managed.named_parameters(remove_duplicate=False))) + 6
    moved = residency.moved_in
    assert moved == weights(managed)
    assert torch.equal(managed(x), expected)
    assert residency.moved_in == moved  # resident across calls: nothing copied again


def test_the_least_recently_used_module_is_moved_out_for_the_next_and_comes_back_exactly() -> None:
    first, second = Toy(seed=1), Toy(seed=2)
    x = torch.randn(2, 8)
    expected = (Toy(seed=1)(x), Toy(seed=2)(x))
    residency = Residency(CPU, FixedBudget(weights(first) + weights(second) // 2, calls_take=0))
    residency.add(first, "first")
    residency.add(second, "second")
    assert torch.equal(first(x), expected[0])
    assert torch.equal(second(x), expected[1])
    assert "embed.weight" in on_card(residency, first)  # its base stays: only blocks, last first, went
    assert "blocks.4.linear.weight" not in on_card(residency, first)
    assert torch.equal(first(x), expected[0])  # brought back: the host copies were never written
    assert "blocks.4.linear.weight" not in on_card(residency, second)


def test_a_module_bigger_than_the_card_streams_its_blocks_through_and_keeps_none_of_them_after() -> None:
    toy = Toy(width=64)
    x = torch.randn(2, 8)
    expected = Toy(width=64)(x)
    residency = Residency(CPU, FixedBudget(10 * MB, calls_take=0))
    residency.add(toy, "toy")
    footprint = component(residency, toy).footprint
    assert footprint.blocks[0] < footprint.blocks[1]  # block 0's weight, tied to block 5's, is in the base
    residency.budget = FixedBudget(footprint.needs(2), calls_take=0)
    seen: dict[int, set[str]] = {}
    for index in range(6):
        toy.blocks[index].register_forward_pre_hook(lambda _, __, i=index: seen.update({i: on_card(residency, toy)}))
    assert torch.equal(toy(x), expected)
    resident = {"embed.weight", "out.weight", "blocks.0.linear.weight", "blocks.0.gain", "blocks.1.linear.weight"}
    for index in range(2, 6):  # each streamed block on the card for its own call only
        streamed = {f"blocks.{i}.gain" for i in range(2, 6)}
        assert resident <= seen[index] and seen[index] & streamed == {f"blocks.{index}.gain"}
    assert on_card(residency, toy) == seen[2] - {"blocks.2.gain", "blocks.2.linear.weight", "blocks.2.linear.bias"}
    assert torch.equal(toy(x), expected)


def test_a_held_module_stays_on_the_card_while_another_runs() -> None:
    held, other = Toy(seed=3), Toy(seed=4)
    residency = Residency(CPU, FixedBudget(10 * MB, calls_take=0))
    residency.add(held, "held")
    residency.add(other, "other")
    residency.budget = FixedBudget(weights(held) + component(residency, other).footprint.needs(0), calls_take=0)
    x = torch.randn(1, 8)
    with holding(held):
        names = on_card(residency, held)
        assert len(names) == len(list(held.named_parameters(remove_duplicate=False))) + 6
        other(x)  # runs streamed, in what is left
        assert on_card(residency, held) == names
    other(x)  # released: the next plan may take from it
    assert on_card(residency, held) != names


def test_a_patch_made_while_held_and_streamed_is_undone_exactly() -> None:
    """As a LoRA is applied: deltas added to the weights where they are while held, removed after."""
    toy = Toy(width=64)
    x = torch.randn(2, 8)
    expected = Toy(width=64)(x)
    block = weights(toy.blocks[1])
    residency = Residency(CPU, FixedBudget(weights(toy) - 2 * block, calls_take=0))
    residency.add(toy, "toy")
    with holding(toy):
        originals = [b.linear.weight.detach().clone() for b in toy.blocks]
        for b in toy.blocks:
            b.linear.weight.data.add_(1.0)
        patched = toy(x)
        for b, original in zip(toy.blocks, originals, strict=True):
            b.linear.weight.data.copy_(original)
    assert not torch.equal(patched, expected)
    assert torch.equal(toy(x), expected)


def test_free_moves_everything_out_and_a_dropped_module_is_not_kept_alive() -> None:
    toy = Toy()
    residency = Residency(CPU, FixedBudget(10 * MB, calls_take=0))
    residency.add(toy, "toy")
    toy(torch.randn(1, 8))
    residency.free()
    assert on_card(residency, toy) == set()
    gone = weakref.ref(toy)
    del toy
    gc.collect()
    assert gone() is None and residency._components() == []


def test_activations_measured_or_estimated_are_set_aside_per_input_size() -> None:
    toy = Toy()
    estimates: list[int | None] = []

    def estimate(elements: int | None) -> int:
        estimates.append(elements)
        return weights(toy) // 5

    residency = Residency(CPU, FixedBudget(weights(toy)))  # the estimate leaves room for part of the blocks
    residency.add(toy, "toy", activation=estimate)
    toy(torch.randn(3, 8))
    assert estimates == [24]
    assert "blocks.4.linear.weight" not in on_card(residency, toy)


@dataclass
class MeasuringCard:
    """A card of `size` bytes on which each call is measured to take `peak` bytes."""

    size: int
    peak_bytes: int
    watched: int = 0

    def room(self, held: int) -> int:
        return self.size

    def watch(self) -> None:
        self.watched += 1

    def peak(self) -> int | None:
        return self.peak_bytes

    def activations(self, expected: int) -> int:
        return expected


def test_a_measured_peak_replaces_the_estimate_and_scales_to_larger_inputs() -> None:
    toy = Toy()
    total = weights(toy)
    card = MeasuringCard(size=total + 1000, peak_bytes=1000)
    residency = Residency(CPU, card)
    residency.add(toy, "toy", activation=lambda elements: 10 * total)  # far too much: tried anyway, and measured
    x = torch.randn(3, 8)
    assert torch.equal(toy(x), Toy()(x))
    assert component(residency, toy).peaks == {24: 1000}
    toy(x)
    assert card.watched == 1  # measured once per input size
    toy(torch.randn(6, 8))  # twice the input: 2000 expected, so a block goes out for it
    assert 48 in component(residency, toy).peaks  # (less the streamed blocks, which a card's peak includes)
    assert "blocks.4.linear.weight" not in on_card(residency, toy)
    card.peak_bytes = 10 * total
    toy(torch.randn(9, 8))  # measured now, so a call that cannot fit is refused by name
    with pytest.raises(NoRoom, match="toy#1 needs"):
        toy(torch.randn(9, 8))


def test_room_for_a_guest_comes_from_the_least_recently_used_and_spares_what_is_in_use() -> None:
    """As an upscaler asks for its weights and a tile before it moves onto the card."""
    first, second, third = Toy(seed=5), Toy(seed=6), Toy(seed=7)
    residency = Residency(CPU, FixedBudget(3 * weights(first), calls_take=0))
    for name, toy in (("first", first), ("second", second), ("third", third)):
        residency.add(toy, name)
        toy(torch.randn(1, 8))
    everything = {name for name, _ in first.named_parameters()} | {f"blocks.{i}.gain" for i in range(6)}
    assert on_card(residency, first) >= everything - {"blocks.5.linear.weight"}
    residency.make_room(weights(first) // 2)  # the least recently used gives it
    assert "blocks.4.linear.weight" not in on_card(residency, first)
    assert "blocks.4.linear.weight" in on_card(residency, second)
    with holding(first):  # in use: even when more is asked for than the others hold, it keeps what it has
        held = on_card(residency, first)
        residency.make_room(3 * weights(first))
        assert on_card(residency, first) == held and on_card(residency, second) == on_card(residency, third) == set()
    residency.make_room(10 * weights(first))  # more than the card: everything not in use goes
    assert on_card(residency, first) == on_card(residency, second) == on_card(residency, third) == set()


def test_host_copies_are_pinned_up_to_a_share_of_the_machines_memory_then_pageable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a CUDA machine (pinning is faked here: this one has no CUDA), as a 6B model would on a small one."""
    pinned: list[int] = []

    def pin(tensor: torch.Tensor) -> torch.Tensor:
        pinned.append(tensor.numel() * tensor.element_size())
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    toy = Toy()
    residency = Residency(CPU, FixedBudget(10 * MB, calls_take=0), prefetch=False)
    residency._cuda = True
    residency._pinnable = weights(toy) // 2
    residency.add(toy, "toy")
    assert 0 < sum(pinned) <= weights(toy) // 2 < weights(toy)
    assert "the rest stays pageable" in caplog.text
    x = torch.randn(2, 8)
    assert torch.equal(toy(x), Toy()(x))


def test_a_held_component_keeps_exactly_its_blocks_and_the_others_make_room_around_it() -> None:
    # Held with 4 blocks (its weights may be patched where they are): more room does not bring more in,
    # less room takes from the others, never from it.
    assert plan("dit", ALL, card(text=6, dit=4), room=40 * MB, fixed=4)["dit"] == 4
    assert plan("dit", ALL, card(text=6, dit=4), room=12 * MB, fixed=4) == {"text": 2, "vae": None, "dit": 4}


def test_a_lora_leaves_the_host_copies_as_they_were_even_when_the_card_could_take_more_during_it() -> None:
    """A hold plans without knowing the input size: the generous estimate leaves some blocks streamed. The
    calls inside it know the size and could bring more in, but a held component stays exactly as it is:
    its streamed blocks' host copies carry the patch, which must come off them, not off a card copy."""
    toy = Toy(width=64)
    x = torch.randn(2, 8)
    expected = Toy(width=64)(x)
    residency = Residency(CPU, FixedBudget(weights(toy)))
    residency.add(toy, "toy", activation=lambda elements: weights(toy) // 3 if elements is None else 0)
    hosts = {name: t.clone() for name, t in toy.named_parameters()}
    lora = LoraWeights("style", {f"blocks.{i}.linear": (torch.randn(2, 64), torch.randn(64, 2)) for i in range(1, 5)})
    with patched(toy, [LoraPatch(lora, 1.0)]):
        assert 0 < component(residency, toy).resident < 6  # the hold: part of the blocks streamed
        styled = toy(x)
        assert component(residency, toy).resident < 6  # the call could have taken them all: it did not
    assert not torch.equal(styled, expected)
    residency.free()  # every weight back to its host copy: the copies are as they were
    assert all(torch.equal(t, hosts[name]) for name, t in toy.named_parameters())
    assert torch.equal(toy(x), expected)


def test_a_call_refused_or_failed_neither_releases_a_hold_it_never_took_nor_counts_as_a_measure() -> None:
    toy = Toy()
    card = MeasuringCard(size=weights(toy) + 1000, peak_bytes=100)
    residency = Residency(CPU, card)
    residency.add(toy, "toy", activation=lambda elements: 0)
    managed = component(residency, toy)
    broken = toy.blocks[3].register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("broke")))
    with pytest.raises(RuntimeError, match="broke"):
        toy(torch.randn(5, 8))
    assert 40 not in managed.peaks and managed.in_use == 0  # a failed call measures nothing
    broken.remove()
    with holding(toy):
        pass
    assert None not in managed.peaks  # a hold without a size measures nothing
    toy(torch.randn(3, 8))  # measured: 100 bytes at this size
    card.peak_bytes = 10 * weights(toy)
    toy(torch.randn(5, 8))  # measured: too much for the card at this size
    with holding(toy, 24):
        with pytest.raises(NoRoom):
            toy(torch.randn(5, 8))
        assert managed.in_use == 1  # the refused call's after-call hook released nothing: still held
    assert managed.in_use == 0


class TiedToBase(Toy):
    """A base layer sharing its weight with the third block's."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(32, 32)
        self.mix.weight = self.blocks[2].linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.out(self.mix(self.embed(x.to(execution_device(self)))))


def test_a_weight_tied_between_the_base_and_a_block_stays_with_the_base() -> None:
    toy = TiedToBase()
    x = torch.randn(2, 8)
    expected = toy(x)
    residency = Residency(CPU, FixedBudget(10 * MB, calls_take=0))
    residency.add(toy, "toy")
    managed = component(residency, toy)
    tied = id(toy.blocks[2].linear.weight)
    assert tied in {id(slot.parameter) for slot in managed.base.slots}
    assert tied not in {id(slot.parameter) for slot in managed.blocks[2].slots}
    residency.budget = FixedBudget(managed.footprint.needs(0), calls_take=0)  # every block streamed
    assert torch.equal(toy(x), expected)


def test_what_a_held_component_needs_inside_a_call_is_set_aside_for_that_call() -> None:
    """A ControlNet is held while the transformer runs: its activations come on top of the transformer's."""
    inside, outer = Toy(seed=8), Toy(seed=9)
    residency = Residency(CPU, FixedBudget(weights(inside) + weights(outer)))
    residency.add(inside, "control", activation=lambda elements: weights(outer) // 4)
    residency.add(outer, "transformer", activation=lambda elements: 0)
    x = torch.randn(1, 8)
    outer(x)
    assert component(residency, outer).resident == 6  # alone, it all fits
    with holding(inside):  # held, but not to run inside its calls (as a LoRA holds the transformer)
        outer(x)
        assert component(residency, outer).resident == 6
    with holding(inside, inside=True):
        outer(x)
        # The transformer stays whole; the held ControlNet gives up blocks (it streams them) until both fit
        # beside its activations and two of its streamed blocks.
        control = component(residency, inside)
        reserve = weights(outer) // 4 + control.footprint.needs(0) - control.footprint.held(0)
        assert component(residency, outer).resident == 6 and control.resident is not None
        assert 0 < control.resident < 6
        assert control.footprint.held(control.resident) + weights(outer) + reserve <= residency.budget.room(0)
        assert control.footprint.held(control.resident + 1) + weights(outer) + reserve > residency.budget.room(0)


def test_a_held_component_that_can_stream_gives_up_blocks_but_keeps_its_base() -> None:
    control = Footprint("control", 1 * MB, (1 * MB,) * 3)
    footprints = {**ALL, "control": control}
    now = card(control=3, dit=None)  # the ControlNet was used last, yet it is the only one to give room
    after = plan("dit", footprints, now, room=14 * MB, streaming=frozenset({"control"}))
    assert after["control"] == 1 and after["dit"] == 10
    after = plan("dit", footprints, now, room=12 * MB, streaming=frozenset({"control"}))
    assert after["control"] == 0 and after["dit"] == 7  # its base stays: the transformer streams some blocks


def test_a_lora_or_controlnet_hold_measures_nothing_the_call_inside_it_is_measured() -> None:
    """What a LoRA's patching or a ControlNet's hold allocates is no measure of the model's calls."""
    toy, control = Toy(seed=10), Toy(seed=11)
    card = MeasuringCard(size=10 * MB, peak_bytes=1234)
    residency = Residency(CPU, card)
    residency.add(toy, "transformer")
    residency.add(control, "control")
    with holding(control, 24, inside=True), holding(toy, 24, exact=True):
        assert card.watched == 0
        toy(torch.randn(3, 8))
        assert card.watched == 1
    assert component(residency, toy).peaks == {24: 1234} and component(residency, control).peaks == {}


def test_a_cuda_cards_room_is_its_free_memory_within_the_process_share_less_what_is_not_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CudaBudget against a fake CUDA card (this machine has none): 80 GiB, 30 GiB used by another process,
    the allocator holding 12 GiB of which 10 are allocated, 6 of those being managed weights."""
    gib = 2**30
    fraction = {"value": 1.0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80 * gib - 30 * gib - 12 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 12 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 10 * gib)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: fraction["value"], raising=False)
    budget = CudaBudget(torch.device("cuda", 0), margin=0)
    # What this process can reach: the 38 GiB free and its own 12 GiB; less the 4 GiB allocated that are not weights.
    assert budget.room(held=6 * gib) == 50 * gib - 4 * gib
    fraction["value"] = 0.25  # a process capped at 20 GiB, as the benchmark's cards are
    assert budget.room(held=6 * gib) == 20 * gib - 4 * gib
    budget.limit = 15 * gib
    assert budget.room(held=6 * gib) == 15 * gib - 4 * gib
    assert budget.activations(123) == 123
    assert usable_memory(torch.device("cuda", 0)) == 20 * gib - 12 * gib  # for `auto`: within the share, now
