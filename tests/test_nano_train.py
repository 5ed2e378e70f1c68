"""Training runs end to end with the project's own code and is reproducible from its seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from zimage_serve.engine import GenerationParams, open_engine
from zimage_serve.errors import ZImageError
from zimage_serve.nano.train import Recipe, Trainer, lr_at, restart_lr_at

TINY = Recipe(
    vocab_size=300,
    vae_steps=3,
    vae_batch=2,
    pool_scenes=8,
    steps=4,
    restart_steps=2,
    batch=4,
    warmup=2,
    dim=32,
    layers=1,
    heads=2,
    text_width=32,
    text_layers=2,
    compile=False,  # one test below compiles; the rest stay quick
)


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
    }


def train(tmp: Path, name: str, recipe: Recipe) -> Path:
    return Trainer(tmp / f"work-{name}", recipe, log=lambda _: None).run(tmp / name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("reference"), "a", TINY)


def test_same_seed_same_weights_and_the_result_loads(reference: Path, tmp_path: Path) -> None:
    first, second = reference, train(tmp_path, "b", TINY)
    assert digest(first) == digest(second)
    assert len(digest(first)) == 3
    engine = open_engine(first, device="cpu")
    assert engine.native_size == TINY.size
    image = engine.generate(GenerationParams("一个红色的圆形", seed=1)).images[0]
    assert isinstance(image, Image.Image) and image.size == (128, 128)


def test_compiled_blocks_train_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What is ours is training through torch.compile's wrapped blocks and saving weights that load.

    Inductor's code generation is torch's to test (and a minute of C++ compiling on a CPU), so the blocks
    compile with AOTAutograd's eager backend: the same Dynamo graphs and wrappers, forward and backward.
    """
    compile_module, compiled_blocks = torch.nn.Module.compile, []

    def compile_eagerly(self: torch.nn.Module, *args: object, **kwargs: object) -> None:
        compiled_blocks.append(self)
        compile_module(self, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eagerly)
    compiled = train(tmp_path, "compiled", Recipe(**{**TINY.__dict__, "compile": True, "steps": 2, "restart_steps": 0}))
    image = open_engine(compiled, device="cpu").generate(GenerationParams("a red circle", seed=1)).images[0]
    assert image.size == (128, 128) and compiled_blocks


def test_other_seed_other_weights(reference: Path, tmp_path: Path) -> None:
    other = Recipe(**{**TINY.__dict__, "seed": 1})
    assert digest(reference) != digest(train(tmp_path, "c", other))


def test_resume_continues_from_the_checkpoint(reference: Path, tmp_path: Path) -> None:
    """Stopped at the end of the first cycle, then resumed through the warm restart: same weights."""
    work = tmp_path / "work-split"
    Trainer(work, Recipe(**{**TINY.__dict__, "restart_steps": 0}), log=lambda _: None).run(tmp_path / "half")
    split = Trainer(work, TINY, log=lambda _: None).run(tmp_path / "split")
    assert digest(reference) == digest(split)


def test_resuming_with_other_settings_is_refused(reference: Path) -> None:
    work = reference.parent / "work-a"
    with pytest.raises(ZImageError, match="other settings \\(dim\\)"):
        Trainer(work, Recipe(**{**TINY.__dict__, "dim": 64}), log=lambda _: None)
    with pytest.raises(ZImageError, match="past the"):
        Trainer(work, Recipe(**{**TINY.__dict__, "steps": 1, "restart_steps": 0}), log=lambda _: None).run(
            reference.parent / "shorter"
        )


def test_learning_rate_schedule() -> None:
    assert lr_at(1, 100, 1.0, 10) == 0.1
    assert lr_at(10, 100, 1.0, 10) == 1.0
    assert abs(lr_at(100, 100, 1.0, 10) - 0.1) < 1e-9
    assert abs(restart_lr_at(0, 50, 1.0) - 0.28) < 1e-9
    assert abs(restart_lr_at(50, 50, 1.0) - 0.02) < 1e-9
