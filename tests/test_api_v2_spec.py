"""Comfy API v2's own specification (vendored in tests/fixtures/comfy-api-v2/, MIT) run against the server
by schemathesis, every operation, as a user: requests that fit the spec get answers whose status, content
type and body the spec allows; requests that break it get a 4xx in v2's error envelope (the spec lists no
validation answer for some operations); none gets a 5xx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.app import serving
from tests.support.clients import requests_session
from tests.support.jobs import ready
from tests.support.tokens import make_tokens
from tests.support.watch import no_server_errors
from zimage_serve.limits import Limits


def refused_in_the_envelope(ctx: Any, response: Any, case: Any) -> bool | None:
    """A request that breaks the spec: any 4xx, with v2's error envelope when it has a body."""
    if response.status_code >= 400 and response.content:
        body = response.json()
        assert isinstance(body.get("error"), dict) and {"code", "message"} <= set(body["error"]), body
    return None


SPEC = Path(__file__).parent / "fixtures" / "comfy-api-v2" / "openapi.yaml"
EXAMPLES = 12
TIGHT = Limits(pixels=16384, steps=8, batch=2, request_pixels=16384)


def test_every_operation_of_the_v2_spec_answers_as_the_spec_says(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens = make_tokens(data)
    with serving(data, auth="on", limits=TIGHT, shutdown_grace_s=0) as running:
        server = running.as_token(tokens["user"])
        ready(running.as_token(tokens["admin"]))
        schema = schemathesis.openapi.from_path(str(SPEC))
        session = requests_session(server)
        calls: dict[str, int] = {}
        strict = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
        with no_server_errors(server):
            for result in schema.get_all_operations():
                operation = result.ok()
                calls[operation.label] = 0

                @given(st.one_of(operation.as_strategy(mode) for mode in GenerationMode))
                @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
                def conforms(case: Any) -> None:
                    calls[case.operation.label] += 1
                    fits = case.meta is None or case.meta.generation.mode is GenerationMode.POSITIVE
                    checks = strict if fits else [not_a_server_error, refused_in_the_envelope]
                    case.call_and_validate(base_url=server.url, session=session, headers=server.headers, checks=checks)

                conforms()
        print(f"schemathesis on the v2 spec: {sum(calls.values())} cases over {len(calls)} operations: {calls}")
        assert len(calls) == 11 and all(count >= 6 for count in calls.values()), calls
