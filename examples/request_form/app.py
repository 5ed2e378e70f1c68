"""A staff request form's back end: a form's fields become one template call.

    ZIMAGE_URL=http://gpu-box:8188 ZIMAGE_TOKEN=zis_... uvicorn app:app --port 8080

Staff open http://host:8080/, describe the picture they need and pick a style; the back end renders the
house template with the prompt, waits for the image and keeps it under `requests/` with who asked. The
token is the back end's own, so the image server sees one user and its quota, and the form never
shows it. Permissions, cost and output standards live here, in one place.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel, Field

from zimage_serve.client import AsyncClient, ClientError

STYLES = {
    "photo": "photorealistic, natural light, 35 mm",
    "poster": "flat vector poster, bold shapes, brand colours",
    "ink": "Chinese ink wash painting, soft brush strokes, rice paper",
}
TEMPLATE = os.environ.get("TEMPLATE", "z-image-turbo")
FOLDER = Path(os.environ.get("REQUESTS_DIR", "requests"))


class StaffRequest(BaseModel):
    requester: str = Field(min_length=1, max_length=64)
    description: str = Field(min_length=3, max_length=500)
    style: Literal["photo", "poster", "ink"] = "photo"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncClient(
        os.environ.get("ZIMAGE_URL", "http://127.0.0.1:8188"), os.environ.get("ZIMAGE_TOKEN")
    ) as client:
        app.state.client = client
        yield


app = FastAPI(title="Picture requests", lifespan=lifespan)


@app.post("/requests", status_code=201)
async def create(request: StaffRequest) -> dict[str, str]:
    try:
        result = await app.state.client.generate(TEMPLATE, prompt=f"{request.description}, {STYLES[request.style]}")
    except ClientError as exc:
        raise HTTPException(502, f"the image server could not make it: {exc}") from None
    request_id = uuid.uuid4().hex[:12]
    FOLDER.mkdir(parents=True, exist_ok=True)
    (FOLDER / f"{request_id}.png").write_bytes(result.data[0])
    record = {**request.model_dump(), "id": request_id, "prompt_id": result.prompt_id, "at": time.time()}
    with open(FOLDER / "log.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {"id": request_id, "image": f"/requests/{request_id}.png"}


@app.get("/requests/{request_id}.png")
async def image(request_id: str) -> FileResponse:
    path = FOLDER / f"{request_id}.png"
    if not request_id.isalnum() or not path.is_file():
        raise HTTPException(404, "no such request")
    return FileResponse(path, media_type="image/png")


@app.get("/", response_class=HTMLResponse)
async def form() -> str:
    options = "".join(f'<option value="{key}">{key}</option>' for key in STYLES)
    return f"""<!doctype html><meta charset="utf-8"><title>Picture requests</title>
<form id="f"><p><input name="requester" placeholder="your name" required>
<p><textarea name="description" placeholder="what picture do you need?" required></textarea>
<p><select name="style">{options}</select> <button>Request</button></form><p><img id="out" alt="">
<script>
document.getElementById("f").onsubmit = async (e) => {{
  e.preventDefault();
  const body = JSON.stringify(Object.fromEntries(new FormData(e.target)));
  const answer = await fetch("/requests", {{method: "POST", headers: {{"Content-Type": "application/json"}}, body}});
  const made = await answer.json();
  if (answer.ok) document.getElementById("out").src = made.image; else alert(JSON.stringify(made.detail));
}};
</script>"""
