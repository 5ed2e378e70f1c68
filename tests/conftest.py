from __future__ import annotations

import os

# One intra-op thread for torch, here and in every process the tests start (they inherit it), set before
# anything imports torch: two threads per process thrash once other processes share the cores, and a test
# that takes 3 s alone took 20-60 s beside a busy machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.checkpoints import write_comfy_root
from tests.redis_server import RedisServer, running_redis
from zimage_serve.cli.common import quiet_libraries
from zimage_serve.nano.random_model import write_random_model

# The hub is unreachable here; make the tokenizer search say so at once instead of timing out.
os.environ["HF_HUB_OFFLINE"] = "1"
quiet_libraries()


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: a worker more than the cores. Many tests wait on a server or a process they started, so
    one more worker keeps the cores busy (on 2 cores: 414 s against 437 s for the whole suite)."""
    return (os.cpu_count() or 1) + 1


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-layout diffusers folder with sharded weights and shard indexes."""
    return write_random_model(tmp_path_factory.mktemp("diffusers") / "Z-Image-Tiny", seed=0, max_shard_size="60KB")


@pytest.fixture(scope="session")
def comfy_root(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI models/ folder with the template's file names (no tokenizer: ComfyUI ships none)."""
    return write_comfy_root(tiny_model, tmp_path_factory.mktemp("comfyui") / "models")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; tests keep apart by key prefix."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server
