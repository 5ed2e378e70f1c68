"""The output cache: bounded by distinct tensor bytes and by entry count, never evicting the current run;
and node signatures, its keys."""

from __future__ import annotations

import json

import torch
from hypothesis import given
from hypothesis import strategies as st

from zimage_serve.workflow.cache import CacheEntry, OutputCache, signature


def test_entry_count_bound_evicts_least_recently_used() -> None:
    cache = OutputCache(max_entries=3)
    for key in "abcde":
        cache.put(key, CacheEntry((key,), None))
    cache.get("a")  # used again: now the most recent
    cache.trim(keep={"e"})
    assert len(cache) == 3 and "a" in cache and "e" in cache and "b" not in cache and "c" not in cache


def test_shared_tensors_count_once_and_the_current_run_is_kept() -> None:
    weights = torch.zeros(1000)
    cache = OutputCache(max_bytes=5000)
    cache.put("loader", CacheEntry((weights,), None))
    cache.put("view", CacheEntry(({"w": weights},), None))  # the same storage seen through another output
    assert cache.nbytes() == 4000
    cache.put("other", CacheEntry((torch.zeros(1000),), None))
    cache.trim(keep={"other", "view"})
    assert "loader" not in cache and "view" in cache and "other" in cache
    assert cache.nbytes() == 8000  # over the bound, but both are the current run's


def test_byte_count_follows_replacement_eviction_and_clear() -> None:
    shared, alone = torch.zeros(250), torch.zeros(500)  # 1000 and 2000 bytes
    cache = OutputCache(max_bytes=10_000, max_entries=2)
    cache.put("a", CacheEntry((shared,), None))
    cache.put("b", CacheEntry((shared, alone), None))
    assert cache.nbytes() == 3000
    cache.put("b", CacheEntry((alone,), None))  # replaced: `shared` is still held by "a"
    assert cache.nbytes() == 3000
    cache.put("c", CacheEntry((torch.zeros(100),), None))
    cache.trim(keep={"c"})  # three entries, bound two: "a" (least recent) goes, and `shared` with it
    assert "a" not in cache and cache.nbytes() == 2400
    cache.clear()
    assert cache.nbytes() == 0 and len(cache) == 0


SOURCE = "0" * 64


def test_signature_ignores_input_order_but_not_types_or_links() -> None:
    def sign(constants: dict[str, object], links: dict[str, tuple[str, int]] | None = None) -> str:
        return signature("Node", None, constants, links or {})

    assert sign({"a": 1, "b": {"x": 1, "y": [2]}}) == sign({"b": {"y": [2], "x": 1}, "a": 1})
    variants = [{"a": 1}, {"a": 1.0}, {"a": True}, {"a": "1"}, {"a": None}, {"a": [1]}, {"a": {"1": 1}}, {}]
    assert len({sign(v) for v in variants}) == len(variants)
    assert sign({}, {"a": (SOURCE, 0)}) != sign({}, {"a": (SOURCE, 1)}) != sign({}, {"a": ("1" * 64, 1)})
    assert signature("Node", "one", {}, {}) != signature("Node", "two", {}, {}) != signature("Other", "two", {}, {})


def test_signature_texts_cannot_be_spliced_into_each_other() -> None:
    # Without lengths and terminators each pair would write the same text.
    pairs = [
        ({"a": "x", "b": "x"}, {"a": "x1:bsx"}),  # strings without their length
        ({"a": 1, "zzs10:uuuuuu": "w"}, {"a": 11, "zz": "uuuuuus1:w"}),  # numbers without an end
        ({"ab": "c"}, {"a": "bc"}),
    ]
    for first, second in pairs:
        assert signature("N", None, first, {}) != signature("N", None, second, {}), (first, second)
    assert signature("N", None, {"a": "x"}, {}) != signature("N", None, {}, {"a": (SOURCE, 0)})


values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([0.0, 1.0, 2.5]) | st.text("ab:;s1", max_size=4),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text("ab", max_size=2), inner, max_size=2),
    max_leaves=4,
)
inputs = st.dictionaries(st.text("ab:1", max_size=3), values, max_size=3)


@given(inputs, inputs)
def test_signatures_agree_exactly_when_the_inputs_write_the_same_sorted_json(
    first: dict[str, object], second: dict[str, object]
) -> None:
    same_json = json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert (signature("N", None, first, {}) == signature("N", None, second, {})) == same_json
