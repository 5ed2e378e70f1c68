"""JSON as the server takes it in and writes it out: standard JSON only, and bounded.

Python's `json` accepts more than JSON: NaN and Infinity, numbers that overflow a float to infinity,
integers of any length, lone UTF-16 surrogates (which no UTF-8 encoder can write back), duplicate keys
(the last one silently wins), and nesting as deep as the C stack allows. Any of those stored in the
queue could make a later answer fail for everyone, so a body holding one is refused, with the place it
was found named (`extra_data.workflow.nodes[3].size`), before anything is stored.

The parser itself marks what it cannot accept (its hooks return a `_Refused` stand-in instead of the
value, as it does not know where it is); one walk over the parsed value then finds the first mark, the
depth and any unwritable string, with the path to it. `dumps` writes strictly: NaN is an error, not text
that is not JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64  # a UI workflow with subgraphs nests ~12 deep; a prompt ~6
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # a 64-bit integer, signed or not (seeds go up to 2**64 - 1)
_LONGEST_INT = len(str(INT_MIN))


class JsonRejected(ValueError):
    """The text is not JSON we accept; `where` is the path to the bad value ("" for the text itself)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}" if where else reason)
        self.where, self.reason = where, reason


class _Refused:
    """Stands where the parser met a value JSON allows (or Python's parser does) but we do not."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Duplicated(dict[str, Any]):
    """An object that named a key twice; `key` is the first repeated one."""

    key: str = ""


def _constant(text: str) -> _Refused:
    return _Refused(f"{text} is not a finite number")


def _float(text: str) -> float | _Refused:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        return _Refused(f"{text[:40]} is too large for a 64-bit float")
    return value


def _int(text: str) -> int | _Refused:
    if len(text) > _LONGEST_INT:
        return _Refused(f"an integer of {len(text.lstrip('-'))} digits is beyond 64 bits")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        return _Refused(f"{text} is beyond 64 bits")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) == len(pairs):
        return found
    duplicated = _Duplicated(found)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            duplicated.key = key
            break
        seen.add(key)
    return duplicated


class _Suspect(Exception):
    """Raised by the quick parse's hooks: the careful parse finds what and where."""


def _object_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise _Suspect
    return found


def _suspect_constant(text: str) -> None:
    raise _Suspect


def _int_once(text: str) -> int:
    if len(text) >= 19:  # near 2**63 or beyond: the careful parse decides
        raise _Suspect
    return int(text)


def _float_once(text: str) -> float:
    value = float(text)
    if value - value != 0.0:  # infinite (NaN cannot come from digits)
        raise _Suspect
    return value


# Most bodies are parsed once, by the C scanner with hooks that only check (a walk over every value
# costs the busiest route more than the parse itself); the depth is checked by counting brackets, or,
# for a large body, by a walk over its containers alone. A hook that finds something, an escape in
# \\uD800-\\uDFFF (perhaps a lone surrogate) or too deep a nesting sends the text to the careful parse,
# whose hooks leave marks where the problems are and whose walk names the first one with its path.
_quick = json.JSONDecoder(
    parse_float=_float_once,
    parse_int=_int_once,
    parse_constant=_suspect_constant,
    object_pairs_hook=_object_once,
    strict=True,
)
_careful = json.JSONDecoder(
    parse_float=_float, parse_int=_int, parse_constant=_constant, object_pairs_hook=_object, strict=True
)


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse `text` (UTF-8 bytes or str) as strict JSON; raises JsonRejected naming the bad part."""
    if isinstance(text, bytes | bytearray):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonRejected("", f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if "\\ud" not in text and "\\uD" not in text:
        try:
            value = _decode(_quick, text, max_depth)
        except _Suspect:
            pass
        else:
            if text.count("{") + text.count("[") <= max_depth or _depth_within(value, max_depth):
                return value
    value = _decode(_careful, text, max_depth)
    check(value, max_depth)
    return value


def _decode(decoder: json.JSONDecoder, text: str, max_depth: int) -> Any:
    try:
        return decoder.decode(text)
    except json.JSONDecodeError as exc:
        raise JsonRejected("", f"not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise JsonRejected("", f"nested more than {max_depth} levels deep") from exc


def _depth_within(value: Any, max_depth: int) -> bool:
    """Whether no container lies deeper than `max_depth`: a walk over containers only, no paths."""
    level: list[Any] = [value]
    for _ in range(max_depth):
        below: list[Any] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            below.extend(c for c in children if isinstance(c, dict | list))
        if not below:
            return True
        level = below
    return False


def check(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise JsonRejected for the first part of a value that is not JSON we accept: a parser's mark, a
    non-finite float, an integer beyond 64 bits, a lone surrogate, a repeated key, too deep a nesting."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if path and isinstance(path[-1], str) and not path[-1].isascii():  # the key first, then its value
            _check_text(path[-1], path[:-1])
        if isinstance(item, dict):
            if len(path) >= max_depth:
                raise JsonRejected(_path(path), f"nested more than {max_depth} levels deep")
            if isinstance(item, _Duplicated):
                raise JsonRejected(_path(path), f"the key {item.key!r} appears more than once")
            for key, child in item.items():
                if not isinstance(key, str):
                    raise JsonRejected(_path(path), f"the key {key!r} is not text")
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            if len(path) >= max_depth:
                raise JsonRejected(_path(path), f"nested more than {max_depth} levels deep")
            stack.extend((child, (*path, index)) for index, child in enumerate(item))
        else:
            reason = _scalar_problem(item)
            if reason is not None:
                raise JsonRejected(_path(path), reason)


def _scalar_problem(item: Any) -> str | None:
    if isinstance(item, _Refused):
        return item.reason
    if isinstance(item, str):
        if not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"holds a lone surrogate (\\u{ord(item[exc.start]):04x}), not text"
        return None
    if isinstance(item, bool) or item is None:
        return None
    if isinstance(item, int):
        return None if INT_MIN <= item <= INT_MAX else f"an integer of {item.bit_length()} bits is beyond 64 bits"
    if isinstance(item, float):
        return None if math.isfinite(item) else f"{item} is not a finite number"
    return f"a {type(item).__name__} is not a JSON value"


def _check_text(key: str, path: tuple[str | int, ...]) -> None:
    reason = _scalar_problem(key)
    if reason is not None:
        raise JsonRejected(_path(path), f"a key {reason}")


def _path(parts: tuple[str | int, ...]) -> str:
    """`extra_data.nodes[3].size`; keys shown as JSON escapes them, so the path itself is always text
    an answer can carry (a key may be the lone surrogate being refused)."""
    shown = ""
    for part in parts:
        if isinstance(part, int):
            shown += f"[{part}]"
        else:
            key = part if part.isascii() and part.isprintable() else json.dumps(part)[1:-1]
            shown += f".{key}" if shown else key
    return shown


# One encoder: json.dumps with an option of its own builds a new encoder on every call.
_encoder = json.JSONEncoder(allow_nan=False)


def dumps(value: Any) -> str:
    """JSON text, refusing (ValueError) what is not JSON rather than writing NaN or Infinity."""
    return _encoder.encode(value)
