"""Device, dtype and memory-mode choices (the CUDA branches are checked through their inputs)."""

from __future__ import annotations

import pytest
import torch

from zimage_serve.engine.devices import (
    GIB,
    TURBO_BF16_BYTES,
    MemoryMode,
    device_kind,
    memory_mode_for,
    pick_device,
    pick_dtypes,
    pick_memory_mode,
)
from zimage_serve.errors import DeviceError

TURBO_BF16 = TURBO_BF16_BYTES  # transformer 12.3 + text encoder 8.0 + VAE 0.2


def test_auto_device_here_is_cpu_in_fp32() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    device = pick_device("auto")
    assert device.type in ("cpu", "mps")
    if device.type == "cpu":
        assert pick_dtypes(device) == (torch.float32, torch.float32)


@pytest.mark.parametrize("requested", ["cuda", "cuda:3"])
def test_unavailable_cuda_is_a_clear_error(requested: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="CUDA"):
        pick_device(requested)


@pytest.mark.parametrize("requested", ["auto", "cpu", "cuda", "cuda:3", "tpu0", "mps", "nonsense!"])
def test_the_context_free_check_agrees_with_the_full_one(requested: str) -> None:
    try:
        expected: torch.device | type[DeviceError] = pick_device(requested)
    except DeviceError:
        expected = DeviceError
    if expected is DeviceError:
        with pytest.raises(DeviceError, match="device"):
            device_kind(requested)
    else:
        assert isinstance(expected, torch.device) and device_kind(requested).type == expected.type


def test_unknown_device_name() -> None:
    with pytest.raises(DeviceError, match=r"not a device name|not supported"):
        pick_device("tpu0")


def test_vae_never_runs_in_fp16() -> None:
    for device in (torch.device("cpu"), torch.device("cuda"), torch.device("mps")):
        model_dtype, vae_dtype = pick_dtypes(device, "fp16")
        assert model_dtype == torch.float16
        assert vae_dtype != torch.float16
    assert pick_dtypes(torch.device("cuda"), "bf16") == (torch.bfloat16, torch.bfloat16)


def test_unknown_dtype() -> None:
    with pytest.raises(DeviceError, match="dtype"):
        pick_dtypes(torch.device("cpu"), "int4")


@pytest.mark.parametrize(
    ("free_gib", "mode"),
    [(80, MemoryMode.GPU), (48, MemoryMode.GPU), (32, MemoryMode.GPU), (24, MemoryMode.SMART), (8, MemoryMode.SMART)],
)
def test_auto_keeps_everything_on_the_card_only_where_the_largest_default_image_fits_beside_it(
    free_gib: int, mode: MemoryMode
) -> None:
    # Turbo's 20.5 GiB and the VAE's estimate for a 2048² image (10 GiB) need about 31 GiB.
    assert memory_mode_for(free_gib * GIB, TURBO_BF16) is mode
    assert pick_memory_mode(torch.device("cuda"), "auto", TURBO_BF16, free_memory=free_gib * GIB) is mode


def test_a_smaller_default_image_or_model_fits_a_smaller_card() -> None:
    assert memory_mode_for(24 * GIB, TURBO_BF16, pixels=1024 * 1024) is MemoryMode.GPU
    assert memory_mode_for(8 * GIB, 50 * 1024**2) is MemoryMode.GPU


def test_smart_memory_needs_cuda() -> None:
    with pytest.raises(DeviceError, match="memory_mode: smart keeps weights in host memory for a CUDA GPU"):
        pick_memory_mode(torch.device("cpu"), "smart", TURBO_BF16)
    assert pick_memory_mode(torch.device("cpu"), "auto", TURBO_BF16) is MemoryMode.GPU


@pytest.mark.parametrize("former", ["model", "sequential"])
def test_the_former_offload_modes_are_smart_memory_now(former: str, caplog: pytest.LogCaptureFixture) -> None:
    assert pick_memory_mode(torch.device("cuda"), former, TURBO_BF16) is MemoryMode.SMART
    assert f"memory mode {former!r} is now called 'smart'" in caplog.text


def test_unknown_memory_mode() -> None:
    with pytest.raises(DeviceError, match="memory_mode: 'tiny'"):
        pick_memory_mode(torch.device("cpu"), "tiny", 0)
