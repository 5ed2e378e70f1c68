"""The catalogue's side of the product-image pipeline: a webhook receiver that keeps a SQLite table of
products up to date as their images land in the bucket. Nothing here asks the image server anything.

    WEBHOOK_SECRET=whsec_... uvicorn receiver:app --port 8090

It loads `products.csv` into `products.sqlite3` (CATALOGUE_DB) once, then for each signed event the image
server sends (`job.succeeded`, `job.failed`) it finds the product by the SKU the batch row carried, and
records where its image is (the object in the bucket, `s3://...`, and a link to it) or the error. Each event is
handled once, however often it is delivered: its `webhook-id` is remembered.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from standardwebhooks import Webhook, WebhookVerificationError

HERE = Path(__file__).parent
CATALOGUE = Path(os.environ.get("CATALOGUE_CSV", HERE / "products.csv"))
DATABASE = Path(os.environ.get("CATALOGUE_DB", "products.sqlite3"))
SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    sku TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    category TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'waiting',  -- waiting, ready, failed
    image TEXT,                              -- where the image is kept: s3://bucket/key (or the server's URL)
    image_url TEXT,                          -- a link to it (presigned links hold for a while only)
    job_id TEXT,
    error TEXT,
    updated REAL
);
CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, received REAL NOT NULL);
"""


def connect() -> sqlite3.Connection:
    db = sqlite3.connect(DATABASE, isolation_level=None)
    db.executescript(SCHEMA)
    return db


def load_catalogue() -> None:
    with CATALOGUE.open(encoding="utf-8", newline="") as rows, contextlib.closing(connect()) as db:
        db.executemany(
            "INSERT OR IGNORE INTO products (sku, title, category) VALUES (:sku, :title, :category)",
            list(csv.DictReader(rows)),
        )


def record(event_id: str, event: dict[str, Any]) -> None:
    """One event, in one transaction with its id: a second delivery of it changes nothing."""
    data = event["data"]
    labels = data.get("metadata")
    fields = labels.get("fields") if isinstance(labels, dict) else None
    sku = fields.get("sku") if isinstance(fields, dict) else None
    if not isinstance(sku, str):
        return  # not a catalogue job (another pipeline's, on the same endpoint)
    with contextlib.closing(connect()) as db:
        db.execute("BEGIN IMMEDIATE")
        if db.execute("INSERT OR IGNORE INTO events (id, received) VALUES (?, ?)", (event_id, time.time())).rowcount:
            if event["type"] == "job.succeeded" and data.get("images"):
                image = data["images"][0]
                db.execute(
                    "UPDATE products SET status = 'ready', image = ?, image_url = ?, job_id = ?, error = NULL, "
                    "updated = ? WHERE sku = ?",
                    (image.get("object", image["url"]), image["url"], data["job_id"], time.time(), sku),
                )
            elif event["type"] == "job.failed":
                messages = [m[1].get("exception_message", "") for m in data.get("messages", []) if len(m) == 2]
                db.execute(
                    "UPDATE products SET status = 'failed', job_id = ?, error = ?, updated = ? "
                    "WHERE sku = ? AND status <> 'ready'",  # an earlier run's failure never hides an image
                    (data["job_id"], "; ".join(filter(None, messages)) or "failed", time.time(), sku),
                )
        db.execute("COMMIT")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    load_catalogue()
    yield


app = FastAPI(title="Product catalogue: image webhooks", lifespan=lifespan)


@app.post("/zimage-hook", status_code=204)
async def zimage_hook(request: Request) -> Response:
    body = await request.body()
    try:  # the signature, and a timestamp within five minutes: a forged or replayed request stops here
        event = Webhook(os.environ["WEBHOOK_SECRET"]).verify(body, dict(request.headers))
    except WebhookVerificationError:
        raise HTTPException(401, "not signed by the image server") from None
    await asyncio.to_thread(record, request.headers["webhook-id"], event)
    return Response(status_code=204)


@app.get("/products")
async def products() -> list[dict[str, Any]]:
    with contextlib.closing(connect()) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM products ORDER BY sku")]
