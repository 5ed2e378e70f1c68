"""GET /metrics: Prometheus' text format (zimage_serve/metrics.py); with authentication on, admins only."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from zimage_serve.metrics import render
from zimage_serve.server.gate import caller
from zimage_serve.server.routes_queue import runtime
from zimage_serve.server.routes_security import admin_only

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def get_metrics(request: Request) -> Response:
    refused = admin_only(caller(request))
    if refused is not None:
        return refused
    text = await asyncio.to_thread(render, runtime(request).metrics)  # reads the queue and the register
    return Response(text, media_type=CONTENT_TYPE_LATEST)
