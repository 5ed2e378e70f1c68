"""`zimage models pull`: real downloads through huggingface_hub, from a loopback server that answers as the hub.

The server (a thread of this test, on a free port) serves tiny checkpoints under the published repositories'
names and paths, in the hub's URL layout: the model listing (`/api/models/{repo}/revision/{rev}`) and file
downloads (`/{repo}/resolve/{rev}/{path}`, HEAD and GET, with the ETag, X-Repo-Commit and Content-Length
huggingface_hub checks, and Range requests). The command runs as a real process with its own environment
(HF_ENDPOINT pointing here, no HF_HUB_OFFLINE, a fresh HF_HOME), as a user runs it: huggingface_hub reads
those variables when it is imported, so only a new process sees them as a user would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.controlnets import write_controlnet
from tests.server import running_server
from zimage_serve.catalogue import CATALOGUE
from zimage_serve.cli import main
from zimage_serve.cli.common import models_roots
from zimage_serve.pull import STAGING
from zimage_serve.workflow.folders import Folders

COMMIT = "5d1e0c3a9b8f7e6d5c4b3a29180f7e6d5c4b3a29"
SPLIT = {
    "split_files/diffusion_models/z_image_turbo_bf16.safetensors": "diffusion_models/z_image_turbo_bf16.safetensors",
    "split_files/text_encoders/qwen_3_4b.safetensors": "text_encoders/qwen_3_4b.safetensors",
    "split_files/vae/ae.safetensors": "vae/ae.safetensors",
}
TRANSFORMER_PATH = "split_files/diffusion_models/z_image_turbo_bf16.safetensors"
CONTROLNET = "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors"


@dataclass
class FakeHub:
    """Repositories (repo → path → bytes) served at `url`; every request is recorded."""

    repos: dict[str, dict[str, bytes]]
    url: str = ""
    truncate_once: set[tuple[str, str]] = field(default_factory=set)  # (repo, path): first GET stops half-way
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range
    lock: threading.Lock = field(default_factory=threading.Lock)

    def downloads(self) -> list[tuple[str, str | None]]:
        with self.lock:
            return [(path, ranged) for method, path, ranged in self.requests if method == "GET" and "/resolve/" in path]


class _Hub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HubServer

    def log_message(self, format: str, *args: object) -> None:  # the test reads `requests` instead
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        hub = self.server.hub
        path = urlsplit(self.path).path
        with hub.lock:
            hub.requests.append((self.command, path, self.headers.get("Range")))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":
            return self._listing("/".join(parts[2:4]), parts[5])
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        return self._error(404, "EntryNotFound")

    def _listing(self, repo: str, revision: str) -> None:
        files = self.server.hub.repos.get(repo)
        if files is None:
            return self._error(404, "RepoNotFound")
        if revision not in ("main", COMMIT):
            return self._error(404, "RevisionNotFound")
        siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(files.items())]
        payload = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings}).encode()
        self._send(200, {"Content-Type": "application/json"}, payload, body=True)

    def _file(self, repo: str, revision: str, name: str, body: bool) -> None:
        hub = self.server.hub
        files = hub.repos.get(repo)
        if files is None:
            return self._error(404, "RepoNotFound")
        if revision not in ("main", COMMIT):
            return self._error(404, "RevisionNotFound")
        if name not in files:
            return self._error(404, "EntryNotFound")
        data = files[name]
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if wanted and body:
            start = int(wanted[1])
            end = int(wanted[2]) if wanted[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, headers, data[start : end + 1], body=True)
        with hub.lock:
            cut = body and (repo, name) in hub.truncate_once
            if cut:
                hub.truncate_once.discard((repo, name))
        if cut:  # promise the whole file, send half, hang up: a transfer broken off by the network
            self._send(200, headers, data[: len(data) // 2], body=True, length=len(data))
            self.close_connection = True
            return None
        return self._send(200, headers, data, body=body)

    def _error(self, status: int, code: str) -> None:
        payload = json.dumps({"error": code}).encode()
        self._send(status, {"X-Error-Code": code, "Content-Type": "application/json"}, payload, body=True)

    def _send(
        self, status: int, headers: dict[str, str], payload: bytes, *, body: bool, length: int | None = None
    ) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload) if length is None else length))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(payload)
            self.wfile.flush()


class _HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub) -> None:
        super().__init__(("127.0.0.1", 0), _Hub)
        self.hub = hub


@pytest.fixture(scope="session")
def published(
    tiny_model: Path, comfy_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, bytes]]:
    """The tiny model under the published repositories' names and paths, with files a pull must leave alone."""
    controlnet = write_controlnet(tmp_path_factory.mktemp("controlnet") / CONTROLNET, "2.1")
    diffusers = {p.relative_to(tiny_model).as_posix(): p.read_bytes() for p in tiny_model.rglob("*") if p.is_file()}
    return {
        "Comfy-Org/z_image_turbo": {
            **{path: (comfy_root / local).read_bytes() for path, local in SPLIT.items()},
            "split_files/diffusion_models/z_image_turbo_fp8.safetensors": b"another variant, not asked for",
            "README.md": b"# z_image_turbo\n",
        },
        "Tongyi-MAI/Z-Image-Turbo": {**diffusers, "README.md": b"# Z-Image-Turbo\n", "assets/showcase.jpg": b"jpeg"},
        "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1": {CONTROLNET: controlnet.read_bytes()},
    }


@pytest.fixture
def hub(published: dict[str, dict[str, bytes]]) -> Iterator[FakeHub]:
    fake = FakeHub({repo: dict(files) for repo, files in published.items()})
    server = _HubServer(fake)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join()


def _env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    """The environment of a user who set only HF_ENDPOINT: no offline switch, token or models folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ZIMAGE_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf-home"),  # a fresh cache: nothing can come from an earlier download
        HF_HUB_DISABLE_TELEMETRY="1",
        ZIMAGE_DATA_DIR=str(tmp_path / "data"),
    )
    return env


def zimage(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zimage_serve", *args], env=env, capture_output=True, text=True, timeout=120
    )


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_pull_lands_the_files_where_the_commands_find_them(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    done = zimage(["models", "pull", "z-image-turbo", "z-image-fun-controlnet"], _env(tmp_path, hub.url))
    assert done.returncode == 0, done.stderr
    models = tmp_path / "data" / "models"
    repo = hub.repos["Comfy-Org/z_image_turbo"]
    for path, local in SPLIT.items():
        assert (models / local).read_bytes() == repo[path]
    tokenizer = hub.repos["Tongyi-MAI/Z-Image-Turbo"]["tokenizer/tokenizer.json"]
    assert (models / "text_encoders" / "qwen_3_4b_tokenizer" / "tokenizer.json").read_bytes() == tokenizer
    assert (models / "model_patches" / CONTROLNET).is_file()
    fetched = {path.rpartition(f"/resolve/{COMMIT}/")[2] for path, _ in hub.downloads()}
    assert "README.md" not in fetched and "split_files/diffusion_models/z_image_turbo_fp8.safetensors" not in fetched
    assert not (models / STAGING).exists(), "a finished pull leaves no staging folder behind"
    assert "z-image-turbo: complete" in done.stdout and "z-image-fun-controlnet: complete" in done.stdout

    # What the server and `zimage run` read when given no --models: this folder.
    monkeypatch.setenv("ZIMAGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("ZIMAGE_MODELS", raising=False)
    monkeypatch.delenv("ZIMAGE_MODEL", raising=False)
    monkeypatch.delenv("ZIMAGE_TOKENIZER", raising=False)
    folders = Folders(models_roots(None))
    assert "z_image_turbo_bf16.safetensors" in folders.names("diffusion_models")
    assert "qwen_3_4b.safetensors" in folders.names("text_encoders")
    assert "ae.safetensors" in folders.names("vae")
    assert CONTROLNET in folders.names("model_patches")

    code, stdout, stderr = _run(["models"], capsys)
    assert code == 0, stderr
    rows = [line.split("\t") for line in stdout.splitlines()]
    assert any(
        kind == "built-in model zimage-nano (complete model)" and status == "usable" for _, kind, _, status in rows
    )
    assert [str(models), "ComfyUI models folder (complete model)"] in [row[:2] for row in rows if row[3] == "usable"]
    assert any(path.endswith(CONTROLNET) and status.startswith("usable by workflows") for path, _, _, status in rows)


def test_serve_reads_the_models_folder_of_its_data_dir(hub: FakeHub, tmp_path: Path) -> None:
    """`zimage serve --data-dir DIR`, given no --models, lists what a pull put in DIR/models."""
    data = tmp_path / "data"
    done = zimage(["models", "pull", "z-image-turbo", "--models", str(data / "models")], _env(tmp_path, hub.url))
    assert done.returncode == 0, done.stderr
    with running_server(data, "--no-worker-process", "--no-preload") as server:
        assert server.json("GET", "/models/diffusion_models") == (
            200,
            ["zimage-nano", "z_image_turbo_bf16.safetensors"],
        )
        assert server.json("GET", "/models/vae") == (200, ["zimage-nano", "ae.safetensors"])


def test_a_second_pull_downloads_nothing(hub: FakeHub, tmp_path: Path) -> None:
    env = _env(tmp_path, hub.url)
    assert zimage(["models", "pull", "z-image-turbo"], env).returncode == 0
    first = len(hub.downloads())
    again = zimage(["models", "pull", "z-image-turbo"], env)
    assert again.returncode == 0, again.stderr
    assert len(hub.downloads()) == first, "nothing is fetched again"
    assert again.stdout.count("already complete") == len(SPLIT) + len(
        [p for p in hub.repos["Tongyi-MAI/Z-Image-Turbo"] if p.startswith("tokenizer/")]
    )
    assert "(0 downloaded," in again.stdout


def test_a_file_that_changed_size_is_fetched_again(hub: FakeHub, tmp_path: Path) -> None:
    env = _env(tmp_path, hub.url)
    assert zimage(["models", "pull", "z-image-turbo"], env).returncode == 0
    vae = tmp_path / "data" / "models" / "vae" / "ae.safetensors"
    vae.write_bytes(vae.read_bytes()[:100])  # a file cut short (copied by hand, say)
    again = zimage(["models", "pull", "z-image-turbo"], env)
    assert again.returncode == 0, again.stderr
    assert vae.read_bytes() == hub.repos["Comfy-Org/z_image_turbo"]["split_files/vae/ae.safetensors"]
    assert "(1 downloaded," in again.stdout


def test_an_interrupted_download_resumes(hub: FakeHub, tmp_path: Path) -> None:
    """The connection drops half-way through a file; the rest is asked for with a Range request.

    The file is larger than huggingface_hub's 10 MiB read chunk, so the break comes after data was written
    (a smaller file is simply fetched again from its start)."""
    published = hashlib.sha256(b"weights").digest() * (24 * 1024 * 1024 // 32)
    hub.repos["Comfy-Org/z_image_turbo"][TRANSFORMER_PATH] = published
    hub.truncate_once.add(("Comfy-Org/z_image_turbo", TRANSFORMER_PATH))
    done = zimage(["models", "pull", "z-image-turbo"], _env(tmp_path, hub.url))
    assert done.returncode == 0, done.stderr
    landed = tmp_path / "data" / "models" / "diffusion_models" / "z_image_turbo_bf16.safetensors"
    assert landed.read_bytes() == published
    transfers = [ranged for path, ranged in hub.downloads() if path.endswith(TRANSFORMER_PATH)]
    assert len(transfers) == 2 and transfers[0] is None, transfers
    resumed = re.fullmatch(r"bytes=(\d+)-", transfers[1] or "")
    assert resumed and 0 < int(resumed[1]) <= len(published) // 2, "the second request asks for the rest only"


def test_the_diffusers_layout_lands_where_checkpoint_loaders_list_it(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = zimage(["models", "pull", "z-image-turbo", "--layout", "diffusers"], _env(tmp_path, hub.url))
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "data" / "models" / "checkpoints" / "Z-Image-Turbo"
    published = hub.repos["Tongyi-MAI/Z-Image-Turbo"]
    for path, data in published.items():
        if path.startswith(("README", "assets/")):
            assert not (folder / path).exists()
        else:
            assert (folder / path).read_bytes() == data
    monkeypatch.setenv("ZIMAGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("ZIMAGE_MODELS", raising=False)
    assert "Z-Image-Turbo" in Folders(models_roots(None)).names("checkpoints")


def test_models_option_chooses_the_folder(hub: FakeHub, tmp_path: Path) -> None:
    chosen = tmp_path / "elsewhere"
    done = zimage(["models", "pull", "z-image-fun-controlnet", "--models", str(chosen)], _env(tmp_path, hub.url))
    assert done.returncode == 0, done.stderr
    assert (chosen / "model_patches" / CONTROLNET).is_file()
    assert not (tmp_path / "data" / "models").exists()
    assert f"--models {chosen}" in " ".join(done.stdout.split())


def test_unknown_name_is_a_usage_error_listing_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = _run(["models", "pull", "z-image-trubo"], capsys)
    flat = " ".join(stderr.split())
    assert code == 2
    assert "unknown model 'z-image-trubo'" in flat
    assert "z-image-turbo, z-image, z-image-fun-controlnet" in flat
    assert "Traceback" not in stderr
    code, _, stderr = _run(["models", "pull", "z-image", "--layout", "gguf"], capsys)
    assert code == 2 and "--layout" in stderr


def test_an_unreachable_hub_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    done = zimage(["models", "pull", "z-image-turbo"], _env(tmp_path, endpoint))
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"cannot reach the Hugging Face hub at {endpoint} (HF_ENDPOINT)" in lines[0]
    assert elapsed < 30, "no long retries before saying so"


def test_a_repository_the_hub_does_not_have_is_named(hub: FakeHub, tmp_path: Path) -> None:
    del hub.repos["alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1"]
    done = zimage(["models", "pull", "z-image-fun-controlnet"], _env(tmp_path, hub.url))
    assert done.returncode == 1
    assert "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1 not found at" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_disk_error_names_the_file(hub: FakeHub, tmp_path: Path) -> None:
    models = tmp_path / "data" / "models"
    models.mkdir(parents=True)
    (models / "vae").write_bytes(b"a file where the vae/ folder should be")
    done = zimage(["models", "pull", "z-image-turbo"], _env(tmp_path, hub.url))
    assert done.returncode == 1
    assert f"{models / 'vae' / 'ae.safetensors'}:" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr


def _template_models(value: object) -> Iterator[dict[str, str]]:
    """The `models` entries (name, url, directory) a ComfyUI template lists for its loaders."""
    if isinstance(value, dict):
        for entry in value.get("models", []) if isinstance(value.get("models"), list) else []:
            if isinstance(entry, dict) and "url" in entry:
                yield entry
        for item in value.values():
            yield from _template_models(item)
    elif isinstance(value, list):
        for item in value:
            yield from _template_models(item)


@pytest.mark.parametrize(
    ("name", "template"), [("z-image-turbo", "image_z_image_turbo.subgraph.json"), ("z-image", "image_z_image.json")]
)
def test_the_comfy_layout_is_what_the_official_template_asks_for(name: str, template: str) -> None:
    """The same files, from the same URLs, under the names and folders the official template loads."""
    document = json.loads((Path(__file__).parent / "fixtures" / "workflows" / template).read_text(encoding="utf-8"))
    wanted = {(m["url"], f"{m['directory']}/{m['name']}") for m in _template_models(document)}
    planned = {
        (f"https://huggingface.co/{source.repo}/resolve/{source.revision}/{path}", source.destination(path))
        for source in CATALOGUE[name].sources("comfy")
        for path in source.patterns
        if "*" not in path  # the tokenizer, which ComfyUI's text-encoder file lacks and the template does not list
    }
    assert planned == wanted


def test_the_catalogue_lists_names_contents_and_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["models", "pull", "--list"], ["models", "catalogue"]):
        code, stdout, _ = _run(args, capsys)
        assert code == 0
        rows = {line.split("\t")[0]: line for line in stdout.splitlines()}
        assert set(rows) == {"z-image-turbo", "z-image", "z-image-fun-controlnet"}
        assert "GB comfy" in rows["z-image-turbo"] and "GB diffusers" in rows["z-image-turbo"]
        assert "Fun ControlNet Union 2.1" in rows["z-image-fun-controlnet"]


def test_models_lists_the_built_in_model_and_the_default_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZIMAGE_DATA_DIR", str(tmp_path / "data"))
    for name in ("ZIMAGE_MODELS", "ZIMAGE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    code, stdout, stderr = _run(["models"], capsys)
    assert code == 0, stderr
    rows = [line.split("\t") for line in stdout.splitlines()]
    assert rows[0][1] == "built-in model zimage-nano (complete model)" and rows[0][3] == "usable"
    default = str(tmp_path / "data" / "models")
    assert next(row for row in rows if row[0] == default)[3].startswith("not created yet: zimage models pull NAME")


def test_models_roots_reads_the_default_folder_only_when_told_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZIMAGE_MODELS", raising=False)
    monkeypatch.setenv("ZIMAGE_DATA_DIR", str(tmp_path / "env-data"))
    data = tmp_path / "served"
    assert models_roots(None, data) == [], "no folder yet: only the built-in model, as before"
    (data / "models").mkdir(parents=True)
    assert models_roots(None, data) == [data / "models"], "`zimage serve --data-dir DIR` reads DIR/models"
    assert models_roots(None) == [], "the environment's data dir has no models folder"
    explicit = tmp_path / "explicit"
    explicit.mkdir()
    assert models_roots([explicit], data) == [explicit]
    monkeypatch.setenv("ZIMAGE_MODELS", str(explicit))
    assert models_roots(None, data) == [explicit]
