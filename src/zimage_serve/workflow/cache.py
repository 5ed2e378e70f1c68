"""Node outputs kept between runs, keyed by a signature of what produced them, within a memory bound.

A node's signature hashes its class, its fingerprint (IS_CHANGED), its constant inputs and, for each
link, the signature of the linked node and the output index. So a node's signature changes exactly when
something it depends on changes, node ids do not matter, and identical sub-graphs share entries.
Size is counted over distinct tensor storages (a MODEL with a new shift shares its weights with the
loader's MODEL and is not counted twice).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_CACHE_BYTES = 8 * 1024**3
DEFAULT_CACHE_ENTRIES = 2000


@dataclass
class CacheEntry:
    outputs: tuple[Any, ...]
    ui: dict[str, list[Any]] | None
    storages: dict[int, int] = field(default_factory=dict)  # storage address → bytes, taken when stored


def signature(class_type: str, fingerprint: Any, constants: dict[str, Any], links: dict[str, tuple[str, int]]) -> str:
    """`links` maps input name → (signature of the source node, output index).

    The text hashed names every part with its length or a terminator, so two different nodes never
    write the same text (a shared cache must never hand one prompt another's output). Not JSON with
    sorted keys for every node: that cost twice as much, a twentieth of a queued job's work on the
    model-free graph (counted with callgrind). BLAKE2 is Python's own, with no OpenSSL set-up per call.
    """
    parts = [_text(class_type), _text(fingerprint)]
    for name in sorted(constants):
        parts.append(f"{len(name)}:{name}{_text(constants[name])}")
    for name in sorted(links):
        source, index = links[name]
        parts.append(f"{len(name)}:{name}<{source}:{index};")
    return hashlib.blake2b("".join(parts).encode(), digest_size=32).hexdigest()


def _text(value: Any) -> str:
    """A value as text that says where it ends: strings by length, numbers by a terminator, anything else
    as JSON with sorted keys (a value JSON cannot write, a tensor say, by its repr)."""
    kind = type(value)
    if kind is str:
        return f"s{len(value)}:{value}"
    if kind is int or kind is float or kind is bool or value is None:
        return f"{kind.__name__}:{value!r};"
    text = _SIGNATURE_JSON.encode(value)
    return f"j{len(text)}:{text}"


# One encoder for every nested value: json.dumps with options of its own builds a new encoder on each call.
_SIGNATURE_JSON = json.JSONEncoder(sort_keys=True, default=repr)


class OutputCache:
    """LRU entries bounded by distinct tensor bytes and by count (many small outputs add up too).

    Bytes are kept as a reference count per storage, updated on every put and eviction, so checking
    the bound costs nothing per run however many entries there are.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, max_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._storage_refs: dict[int, list[int]] = {}  # storage address → [bytes, entries using it]
        self._bytes = 0
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CacheEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, entry: CacheEntry) -> None:
        entry.storages = _storages(entry.outputs)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._release(old)
            self._entries[key] = entry
            for address, size in entry.storages.items():
                ref = self._storage_refs.setdefault(address, [size, 0])
                if ref[1] == 0:
                    self._bytes += size
                ref[1] += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._storage_refs.clear()
            self._bytes = 0

    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def trim(self, keep: set[str]) -> None:
        """Evict least recently used entries outside `keep` until the cache fits both bounds."""
        with self._lock:
            while self._bytes > self.max_bytes or len(self._entries) > self.max_entries:
                # The oldest entries come first and `keep` (the running prompts') are among the newest,
                # so this finds a victim at once.
                victim = next((key for key in self._entries if key not in keep), None)
                if victim is None:
                    return
                self._release(self._entries.pop(victim))

    def _release(self, entry: CacheEntry) -> None:
        for address in entry.storages:
            ref = self._storage_refs[address]
            ref[1] -= 1
            if ref[1] == 0:
                self._bytes -= ref[0]
                del self._storage_refs[address]


def _storages(outputs: tuple[Any, ...]) -> dict[int, int]:
    found: dict[int, int] = {}
    for tensor in _tensors(outputs, set()):
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def _tensors(value: Any, visited: set[int]) -> Iterator[torch.Tensor]:
    if id(value) in visited:
        return
    visited.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, torch.nn.Module):
        yield from value.parameters()
        yield from value.buffers()
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, visited)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item, visited)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from _tensors(getattr(value, item.name), visited)
