"""Fuzzing the server: schemathesis on its own OpenAPI schema, and hypothesis with hostile bodies.

Every answer must be below 500 and no traceback may be logged; each fuzzer ends by checking that the
listings are strict JSON and that a normal job still runs. The server runs in this process, with
authentication on (schemathesis as an admin, so the admin routes are fuzzed too; the hostile bodies as a
user) and with tight limits, so the jobs the fuzzers do get queued stay cheap; each fuzzer has its own.
Bounded runs: SCHEMA_EXAMPLES per operation, BODY_EXAMPLES hostile bodies (the counts are in the README).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.support.app import AppServer, serving
from tests.support.clients import requests_session
from tests.support.jobs import done, listings_are_strict, ready, small_job, submit
from tests.support.watch import no_server_errors
from zimage_serve.limits import Limits
from zimage_serve.security.tokens import TokenStore
from zimage_serve.server.v2.envelope import is_v2

# ZIMAGE_FUZZ_SCALE=10 runs ten times as many (a deeper run by hand; the suite's run is bounded).
SCALE = int(os.environ.get("ZIMAGE_FUZZ_SCALE", "1"))
SCHEMA_EXAMPLES = 50 * SCALE
BODY_EXAMPLES = 600 * SCALE
TIGHT = Limits(pixels=16384, steps=8, batch=2, request_pixels=16384)  # OpenAI: one image, 128² at most


@contextmanager
def fuzzed(data: Path) -> Iterator[dict[str, AppServer]]:
    """A server with authentication on and tight limits, called as "admin" or as "user"; at the end, no
    5xx answered and no traceback logged. Stopped at once: what the fuzzers queued goes with it."""
    store = TokenStore(data / "auth.sqlite3")
    admin, _ = store.create("fuzzing-admin-account", "admin")
    user, _ = store.create("fuzzing-user-account", "user")
    store.close()
    with serving(data, auth="on", limits=TIGHT, shutdown_grace_s=0) as running:
        ready(running)
        with no_server_errors(running):
            yield {"admin": running.as_token(admin), "user": running.as_token(user)}


def still_serves(server: AppServer) -> None:
    """After the fuzzing: strict listings, and a normal job that runs (ahead of what the fuzzers queued)."""
    listings_are_strict(server)
    job = submit(server, small_job("after-fuzz"), front=True)
    assert done(server, job, timeout=300)["status"]["completed"]


def test_no_operation_of_the_schema_answers_a_5xx(tmp_path: Path) -> None:
    """Each operation of /openapi.json, with up to SCHEMA_EXAMPLES cases from schemathesis, drawn from both
    of its modes: bodies and parameters that fit the schema, and ones that break it."""
    with fuzzed(tmp_path / "data") as servers:
        server = servers["admin"]
        schema = schemathesis.openapi.from_dict(server.json("GET", "/openapi.json")[1])
        session = requests_session(server)
        calls: dict[str, int] = {}
        # Comfy API v2's operations are fuzzed against the spec that defines them (tests/test_api_v2_spec.py).
        operations = [result.ok() for result in schema.get_all_operations()]
        operations = [operation for operation in operations if not is_v2(operation.path)]
        # POST /free last: each unload it is fuzzed into makes the next prompts load the models again,
        # which costs every operation after it seconds a call (a prompt after it still runs: still_serves).
        operations.sort(key=lambda operation: operation.label == "POST /free")
        for operation in operations:
            calls[operation.label] = 0

            @given(st.one_of(operation.as_strategy(mode) for mode in GenerationMode))
            @settings(
                max_examples=SCHEMA_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
            )
            def answers_below_500(case: Any) -> None:
                calls[case.operation.label] += 1
                case.call_and_validate(
                    base_url=server.url, session=session, headers=server.headers, checks=[not_a_server_error]
                )

            answers_below_500()
        print(f"schemathesis: {sum(calls.values())} cases over {len(calls)} operations: {calls}")
        assert "POST /prompt" in calls and len(calls) >= 20 and sum(calls.values()) >= 10 * len(calls), calls
        still_serves(server)


# -- hostile bodies, written as raw text (NaN, Infinity, repeated keys and lone surrogates are text
# -- that json.dumps would never write) ------------------------------------------------------------
HOSTILE_TEXT = st.lists(
    st.sampled_from(["a", "é", "猫", "\r", "\n", "\x00", "\ud800", "\udfff", "/", "..", "%date:yyyy%"]), max_size=8
).map("".join)


def scalars() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
        st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "9" * 400]),
        st.floats(allow_nan=True, allow_infinity=True).map(_number),
        HOSTILE_TEXT.map(lambda text: json.dumps(text)),
        st.sampled_from(["true", "false", "null"]),
    )


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def values() -> st.SearchStrategy[str]:
    return st.recursive(
        scalars(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
            st.lists(st.tuples(st.sampled_from(["a", "a", "b", "class_type", "\ud800"]), inner), max_size=4).map(
                lambda pairs: "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}"
            ),
            st.integers(min_value=1, max_value=3000).map(lambda depth: "[" * depth + "]" * depth),
        ),
        max_leaves=12,
    )


VALUES = values()  # built once: a recursive strategy checks itself at its first draw, which costs


FIELDS = ["number", "client_id", "extra_data", "front", "prompt_id", "partial_execution_targets"]
INPUTS = [("3", "seed"), ("3", "cfg"), ("3", "steps"), ("3", "denoise"), ("13", "width"), ("13", "batch_size"),
          ("6", "text"), ("9", "filename_prefix"), ("11", "shift"), ("3", "undeclared")]  # fmt: skip


@st.composite
def hostile_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["input", "field", "node", "whole", "other route"]))
    graph = json.dumps(small_job("fuzz"))
    if kind == "input":
        node, name = draw(st.sampled_from(INPUTS))
        prompt = small_job("fuzz")
        prompt[node]["inputs"][name] = "__HOSTILE__"
        body = json.dumps({"prompt": prompt}).replace('"__HOSTILE__"', draw(VALUES))
        return "/prompt", body.encode("utf-8", "surrogatepass")
    if kind == "field":
        field = draw(st.sampled_from(FIELDS))
        return "/prompt", f'{{"prompt": {graph}, {json.dumps(field)}: {draw(VALUES)}}}'.encode("utf-8", "surrogatepass")
    if kind == "node":
        node = draw(VALUES)
        return "/prompt", f'{{"prompt": {{"1": {node}, "1": {node}}}}}'.encode("utf-8", "surrogatepass")
    if kind == "whole":
        return "/prompt", draw(VALUES).encode("utf-8", "surrogatepass")
    route = draw(st.sampled_from(["/queue", "/history", "/interrupt", "/free", "/v1/images/generations"]))
    return route, draw(VALUES).encode("utf-8", "surrogatepass")


def test_hostile_bodies_never_get_a_5xx(tmp_path: Path) -> None:
    sent: dict[str, int] = {}
    with fuzzed(tmp_path / "data") as servers:
        server = servers["user"]

        @given(hostile_bodies())
        @settings(max_examples=BODY_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        def never_a_5xx(sample: tuple[str, bytes]) -> None:
            path, body = sample
            sent[path] = sent.get(path, 0) + 1
            status, _, content = server.request("POST", path, raw=body)
            assert status < 500, (path, body[:300], content[:300])
            if status >= 400 and content:
                json.loads(content)  # an error the client can read

        never_a_5xx()
        print(f"hypothesis: {sum(sent.values())} hostile bodies: {sent}")
        still_serves(server)
