"""The examples in examples/ run as their README says, against a real server, with zimage-nano."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server import Listening, free_port
from tests.support.threaded import threaded_server

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # `zimage` beside this python


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listening]:
    with threaded_server(tmp_path_factory.mktemp("examples") / "data") as server:
        yield server


def test_product_images_from_a_catalogue(tmp_path: Path, served: Listening) -> None:
    env = {**os.environ, "PATH": PATH, "TEMPLATE": "zimage-nano", "SERVER": served.url, "OUT": str(tmp_path)}
    script = EXAMPLES / "product_images" / "run.sh"
    result = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    made = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert made == [
        "bags/BAG-101_42.png",
        "bags/BAG-102_42.png",
        "home/LAMP-201_42.png",
        "home/MUG-301_42.png",
        "shoes/SHOE-001_42.png",
        "shoes/SHOE-002_42.png",
    ]
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok"] * 6
    # The server is shared with the other examples, run in any order: read this script's jobs only.
    history = served.json("GET", "/history")[1].values()
    batch_jobs = [entry["prompt"] for entry in history if entry["prompt"][3].get("source") == "zimage batch"]
    nodes = [node for job in batch_jobs for node in job[2].values()]
    texts = [node["inputs"]["text"] for node in nodes if node["class_type"] == "CLIPTextEncode"]
    assert len(batch_jobs) == 6 and all(t.startswith("E-commerce product photo of ") for t in texts if t.strip())
    again = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "6 of 6 rows finished earlier are skipped" in again.stderr


def test_a_daily_cover_is_made_once_per_date(tmp_path: Path, served: Listening) -> None:
    command = [
        sys.executable,
        str(EXAMPLES / "daily_cover" / "cover.py"),
        "--server",
        served.url,
        "--template",
        "zimage-nano",
        "--out",
        str(tmp_path),
        "--date",
        "2026-12-01",
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    cover = tmp_path / "2026-12-01.png"
    assert cover.is_file() and first.stdout.startswith(f"{cover}: ")
    made = cover.stat().st_ino
    second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "is there already" in second.stdout and cover.stat().st_ino == made
    forced = subprocess.run([*command, "--force"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0 and cover.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    unreachable = subprocess.run(
        [*command[:3], f"http://127.0.0.1:{free_port()}", *command[4:], "--date", "2026-12-02"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert unreachable.returncode == 1 and "cover for 2026-12-02:" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_a_staff_request_form_back_end(tmp_path: Path, served: Listening) -> None:
    port = free_port()
    env = {**os.environ, "ZIMAGE_URL": served.url, "TEMPLATE": "zimage-nano", "REQUESTS_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=EXAMPLES / "request_form", env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"{base}/").status_code == 200
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
        asked = {"requester": "li.wei", "description": "一个蓝色的正方形 for the tea poster", "style": "ink"}
        answer = httpx.post(f"{base}/requests", json=asked, timeout=60)
        assert answer.status_code == 201, answer.text
        image = httpx.get(base + answer.json()["image"])
        assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
        [logged] = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text(encoding="utf-8").splitlines()]
        assert logged["requester"] == "li.wei" and logged["id"] == answer.json()["id"]
        refused = httpx.post(f"{base}/requests", json={"requester": "x", "description": "", "style": "oil"})
        assert refused.status_code == 422
        assert {tuple(e["loc"]) for e in refused.json()["detail"]} == {("body", "description"), ("body", "style")}
        assert httpx.get(f"{base}/requests/nope.png").status_code == 404
    finally:
        process.terminate()
        process.wait(30)


def test_product_images_land_in_the_bucket_and_the_catalogue_hears_of_each_by_webhook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline of the README's last section: `zimage serve --output-store ...`, an endpoint registered,
    the receiver running, the batch run with WEBHOOK set; the receiver's table fills in, with no polling."""
    import ipaddress

    from tests.support.jobs import wait_until
    from tests.support.s3 import BUCKET, running_s3
    from zimage_serve.storage.bucket import OutputStoreSettings
    from zimage_serve.webhooks.delivery import DeliveryPolicy
    from zimage_serve.webhooks.store import WebhookStore

    data, port = tmp_path / "data", free_port()
    hooks = WebhookStore(data / "queue.sqlite3")
    _, secret = hooks.add("catalogue", f"http://127.0.0.1:{port}/zimage-hook", ["succeeded", "failed"])
    hooks.close()
    loopback = DeliveryPolicy(allowed=(ipaddress.ip_network("127.0.0.0/8"),), first_delay_s=0.1, poll_s=0.05)
    store = OutputStoreSettings(f"s3://{BUCKET}/catalogue", poll_s=0.05)
    database = tmp_path / "products.sqlite3"
    env = {**os.environ, "WEBHOOK_SECRET": secret, "CATALOGUE_DB": str(database)}
    command = [sys.executable, "-m", "uvicorn", "receiver:app", "--port", str(port), "--log-level", "warning"]
    with running_s3(monkeypatch) as s3, threaded_server(data, webhooks=loopback, outputs=store) as server:
        receiver = subprocess.Popen(command, cwd=EXAMPLES / "product_images", env=env)
        try:
            base = f"http://127.0.0.1:{port}"

            def answering() -> bool:
                assert receiver.poll() is None, "the receiver stopped"
                try:
                    return httpx.get(f"{base}/products").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(answering, timeout=60)
            assert {p["status"] for p in httpx.get(f"{base}/products").json()} == {"waiting"}
            batch = {**os.environ, "PATH": PATH, "TEMPLATE": "zimage-nano", "SERVER": server.url,
                     "WEBHOOK": "catalogue", "OUT": str(tmp_path / "images")}  # fmt: skip
            script = EXAMPLES / "product_images" / "run.sh"
            result = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=batch, timeout=300)
            assert result.returncode == 0, result.stderr
            wait_until(lambda: all(p["status"] == "ready" for p in httpx.get(f"{base}/products").json()), timeout=60)
            products = httpx.get(f"{base}/products").json()
            assert sorted(p["sku"] for p in products) == ["BAG-101", "BAG-102", "LAMP-201", "MUG-301", "SHOE-001",
                                                          "SHOE-002"]  # fmt: skip
            keys = s3.keys()
            assert len(keys) == 6 and all(key.startswith("catalogue/") for key in keys)
            assert sorted(p["image"] for p in products) == sorted(f"s3://{BUCKET}/{key}" for key in keys)
            for product in products:  # each link is the product's own image, as the batch saved it locally
                saved = tmp_path / "images" / f"{product['category']}/{product['sku']}_42.png"
                assert httpx.get(product["image_url"]).content == saved.read_bytes()
        finally:
            receiver.terminate()
            receiver.wait(30)
