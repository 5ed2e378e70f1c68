"""The output cache: bounded by distinct tensor bytes and by entry count, never evicting the current run."""

from __future__ import annotations

import torch

from zimage_serve.workflow.cache import CacheEntry, OutputCache


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
