"""strict_json: what JSON the server accepts, where it says the problem is, and that it writes only JSON."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zimage_serve import strict_json
from zimage_serve.strict_json import JsonRejected

REFUSED = [
    ('{"a": NaN}', "a", "NaN is not a finite number"),
    ('{"a": [1, {"b": -Infinity}]}', "a[1].b", "-Infinity is not a finite number"),
    ('{"n": 1e400}', "n", "too large for a 64-bit float"),
    ('{"n": ' + "9" * 400 + "}", "n", "400 digits"),
    ('{"n": 18446744073709551616}', "n", "beyond 64 bits"),
    ('{"n": -9223372036854775809}', "n", "beyond 64 bits"),
    ('{"q": {"a": 1, "a": 2}}', "q", "'a' appears more than once"),
    ('{"k": "\\ud800"}', "k", "lone surrogate"),
    ('{"\\udc00": 1}', "", "lone surrogate"),
    ('{"\\udc00": {"x": NaN}}', "", "a key holds a lone surrogate"),
    ('{"ok": {"\\udc00": 1}}', "ok", "a key holds a lone surrogate"),
    ("[" * 65 + "]" * 65, "[0]" * 63, "nested more than 64"),
    ("[" * 100_000 + "]" * 100_000, "", "nested more than 64"),
    ('{"a": ', "", "not valid JSON"),
]


@pytest.mark.parametrize(("text", "where", "reason"), REFUSED, ids=[r[2] for r in REFUSED])
def test_refused_with_the_path_named(text: str, where: str, reason: str) -> None:
    with pytest.raises(JsonRejected) as refused:
        strict_json.loads(text.encode())
    assert refused.value.where.startswith(where) and reason in str(refused.value)
    str(refused.value).encode("utf-8")  # the message itself is always text an answer can carry


ACCEPTED = [
    '{"seed": 18446744073709551615, "low": -9223372036854775808}',
    '{"e": "\\ud83d\\ude00", "zh": "一个红色的圆形", "f": 1.5e308, "z": -0.0}',
    "[" * 64 + "]" * 64,
    '{"a": ' * 64 + "1" + "}" * 64,
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_what_json_allows_within_the_bounds_is_accepted(text: str) -> None:
    assert strict_json.loads(text) == json.loads(text)


def test_bytes_that_are_not_utf8_are_refused() -> None:
    with pytest.raises(JsonRejected, match="not UTF-8"):
        strict_json.loads(b'{"a": "\xff"}')


def test_dumps_refuses_what_is_not_json() -> None:
    with pytest.raises(ValueError):
        strict_json.dumps({"x": float("nan")})
    assert strict_json.dumps({"x": 1.5}) == '{"x": 1.5}'


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=30,
)  # fmt: skip


@given(JSON_VALUES)
def test_every_value_json_dumps_writes_comes_back_the_same(value: object) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        try:
            assert strict_json.loads(text) == json.loads(text)
        except JsonRejected as refused:  # only for lone surrogates in generated text
            assert "surrogate" in str(refused)
