"""Training zimage-nano from nothing, reproducibly from a seed, on a few CPU cores.

Stages, each checkpointed under the work dir so an interrupted run resumes where it stopped:
1. a byte-level BPE tokenizer trained on generated captions (English and Chinese);
2. the VAE (diffusers AutoencoderKL, 16 latent channels, 8x downsampling), on random crops of scenes;
3. a pool of training scenes encoded once to latents (normalised by the VAE's scaling/shift factors);
4. the text encoder (transformers Qwen3Model) and the transformer (diffusers ZImageTransformer2DModel)
   together, with Z-Image's flow-matching objective: x_t = (1-σ)·x0 + σ·ε, the transformer fed t = 1-σ
   and trained to output x0 - ε (the engine negates it into the velocity), σ logit-normal then shifted
   by 3 as at inference;
5. export of the EMA weights as an official-layout diffusers folder in bf16.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from zimage_serve.engine import configs
from zimage_serve.engine.construction import building
from zimage_serve.engine.prompt import prompt_token_ids
from zimage_serve.engine.schedule import TURBO_SCHEDULER_CONFIG
from zimage_serve.errors import ZImageError
from zimage_serve.nano import scenes
from zimage_serve.nano.random_model import model_index
from zimage_serve.nano.tokenizer import train_tokenizer

Log = Callable[[str], None]
SHIFT = 3.0


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    size: int = 128  # native resolution
    vocab_size: int = 768
    cjk_split: bool = True  # tokenizer merges stop at CJK character boundaries (False: first shipped model)
    unsaid_defaults: bool = True  # only defaults go unsaid in captions (large, centre); see scenes.caption
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    pool_scenes: int = 20000
    steps: int = 6400
    restart_steps: int = 1400  # a second, lower cosine cycle after `steps` (a warm restart)
    batch: int = 32
    lr: float = 4e-4
    warmup: int = 200
    ema: float = 0.999
    dim: int = 192
    layers: int = 4
    heads: int = 4
    text_width: int = 128
    text_layers: int = 3
    compile: bool = True  # torch.compile the transformer's blocks (needs a C++ compiler; ~1.2x faster steps)


def transformer_config(recipe: Recipe) -> dict[str, Any]:
    head = recipe.dim // recipe.heads
    config = dict(configs.TURBO_TRANSFORMER)
    config.update(
        dim=recipe.dim,
        n_layers=recipe.layers,
        n_refiner_layers=1,
        n_heads=recipe.heads,
        n_kv_heads=recipe.heads,
        cap_feat_dim=recipe.text_width,
        axes_dims=configs.rope_axes(head),
    )
    return config


def text_encoder_config(recipe: Recipe, vocab_size: int) -> dict[str, Any]:
    config = dict(configs.TURBO_TEXT_ENCODER)
    config.update(
        vocab_size=vocab_size,
        hidden_size=recipe.text_width,
        intermediate_size=recipe.text_width * 3,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=recipe.text_width // 4,
        max_position_embeddings=512,
    )
    return config


def vae_config() -> dict[str, Any]:
    config = dict(configs.FLUX_VAE)
    config.update(block_out_channels=[16, 32, 64, 64], norm_num_groups=8, layers_per_block=1, sample_size=128)
    return config


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def restart_lr_at(step: int, total: int, peak: float) -> float:
    """The warm restart: cosine from 0.28 to 0.02 of the first cycle's peak."""
    return peak * (0.02 + 0.13 * (1 + math.cos(math.pi * step / total)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# Step counts may grow between runs of one work dir (training resumes); anything else changes the model.
RESUMABLE_CHANGES = frozenset({"steps", "restart_steps"})


def _check_same_run(path: Path, recipe: Recipe) -> None:
    if not path.exists():
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ZImageError(f"{path}: unreadable ({exc}); use a fresh --work-dir") from exc
    changed = sorted(k for k, v in asdict(recipe).items() if k not in RESUMABLE_CHANGES and previous.get(k) != v)
    if changed:
        raise ZImageError(
            f"{path.parent} holds a run with other settings ({', '.join(changed)}); its checkpoints cannot be "
            "resumed with these. Use a fresh --work-dir."
        )


def _save(state: Any, path: Path) -> None:
    """Write aside, then rename: an interrupted save never leaves a corrupt checkpoint to resume from."""
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)


def to_tensor(images: list[Any]) -> torch.Tensor:
    array = np.stack([scenes.to_array(image) for image in images]).astype(np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


class Trainer:
    def __init__(self, work: Path, recipe: Recipe, log: Log = print) -> None:
        self.work, self.recipe, self.log = work, recipe, log
        work.mkdir(parents=True, exist_ok=True)
        _check_same_run(work / "recipe.json", recipe)
        (work / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
        self.timings: dict[str, float] = {}

    def _caption(self, scene: scenes.Scene, language: str, rng: random.Random) -> str:
        return scenes.caption(scene, language, rng, unsaid_defaults=self.recipe.unsaid_defaults)

    # -- 1. tokenizer ------------------------------------------------------------------------
    def tokenizer(self) -> Any:
        folder = self.work / "tokenizer"
        if not (folder / "tokenizer.json").exists():
            rng = random.Random(self.recipe.seed)
            corpus = [
                self._caption(scenes.random_scene(rng), lang, rng) for _ in range(6000) for lang in scenes.LANGUAGES
            ]
            train_tokenizer(corpus, self.recipe.vocab_size, self.recipe.cjk_split).save_pretrained(folder)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))

    # -- 2. VAE ------------------------------------------------------------------------------
    def vae(self) -> AutoencoderKL:
        path = self.work / "vae.pt"
        torch.manual_seed(self.recipe.seed)
        with building():
            vae = AutoencoderKL.from_config(vae_config())
        if path.exists():
            vae.load_state_dict(torch.load(path, weights_only=True))
            return vae.eval()
        started = time.perf_counter()
        r = self.recipe
        rng = random.Random(r.seed + 1)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
        vae.train()
        for step in range(1, r.vae_steps + 1):
            set_lr(optimizer, lr_at(step, r.vae_steps, r.vae_lr, warmup=max(1, r.vae_steps // 20)))
            batch = to_tensor([scenes.render(scenes.random_scene(rng), r.size) for _ in range(r.vae_batch)])
            top, left = rng.randrange(r.size - r.vae_crop + 1), rng.randrange(r.size - r.vae_crop + 1)
            batch = batch[:, :, top : top + r.vae_crop, left : left + r.vae_crop]
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            rec_loss = F.mse_loss(reconstruction, batch) + F.l1_loss(reconstruction, batch)
            loss = rec_loss + r.vae_kl * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            if step % 50 == 0 or step == r.vae_steps:
                self.log(
                    f"vae step {step}/{r.vae_steps} reconstruction {rec_loss.item():.4f} "
                    f"({time.perf_counter() - started:.0f}s)"
                )
        _save(vae.state_dict(), path)
        self.timings["vae"] = time.perf_counter() - started
        return vae.eval()

    # -- 3. latent pool ----------------------------------------------------------------------
    def pool(self, vae: AutoencoderKL) -> tuple[torch.Tensor, list[scenes.Scene], float, float]:
        path = self.work / "pool.pt"
        if path.exists():
            saved = torch.load(path, weights_only=False)
            return saved["latents"], saved["scenes"], saved["scale"], saved["shift"]
        started = time.perf_counter()
        rng = random.Random(self.recipe.seed + 2)
        pool_scenes = [scenes.random_scene(rng) for _ in range(self.recipe.pool_scenes)]
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(pool_scenes), 64):
                images = [scenes.render(s, self.recipe.size) for s in pool_scenes[start : start + 64]]
                chunks.append(vae.encode(to_tensor(images)).latent_dist.mean)
        raw = torch.cat(chunks)
        shift, scale = float(raw.mean()), float(1.0 / raw.std())
        latents = ((raw - shift) * scale).to(torch.float16)
        _save({"latents": latents, "scenes": pool_scenes, "scale": scale, "shift": shift}, path)
        self.timings["pool"] = time.perf_counter() - started
        self.log(f"encoded {len(pool_scenes)} scenes; latent scale {scale:.4f} shift {shift:.4f}")
        return latents, pool_scenes, scale, shift

    # -- 4. text encoder + transformer ---------------------------------------------------------
    def diffusion(
        self, tokenizer: Any, latents: torch.Tensor, pool: list[scenes.Scene]
    ) -> tuple[ZImageTransformer2DModel, Qwen3Model]:
        r = self.recipe
        torch.manual_seed(r.seed + 3)
        with building():
            transformer = ZImageTransformer2DModel.from_config(transformer_config(r))
            text_encoder = Qwen3Model(Qwen3Config(**text_encoder_config(r, len(tokenizer))))
        params = list(transformer.parameters()) + list(text_encoder.parameters())
        optimizer = torch.optim.AdamW(params, lr=r.lr, weight_decay=0.01, betas=(0.9, 0.99))
        ema = [p.detach().clone() for p in params]
        rng = random.Random(r.seed + 4)
        generator = torch.Generator().manual_seed(r.seed + 5)
        first = 1
        path = self.work / "diffusion.pt"
        if path.exists():
            state = torch.load(path, weights_only=False)
            transformer.load_state_dict(state["transformer"])
            text_encoder.load_state_dict(state["text_encoder"])
            optimizer.load_state_dict(state["optimizer"])
            ema = state["ema"]
            rng.setstate(state["rng"])
            generator.set_state(state["generator"])
            first = state["step"] + 1
            if first > r.steps + r.restart_steps + 1:
                raise ZImageError(f"{path} is at step {state['step']}, past the {r.steps + r.restart_steps} asked for")
            self.log(f"resuming diffusion training at step {first}")
        if r.compile:
            # Regional: the repeated blocks are nearly all the work, and they compile once for each of the two
            # caption widths a batch can have, where the whole model (lists, Python loops) would not.
            transformer.compile_repeated_blocks()
        started = time.perf_counter()
        transformer.train()
        text_encoder.train()
        pad = tokenizer.pad_token_id
        total = r.steps + r.restart_steps
        for step in range(first, total + 1):
            if step <= r.steps:
                set_lr(optimizer, lr_at(step, r.steps, r.lr, r.warmup))
            else:
                set_lr(optimizer, restart_lr_at(step - r.steps, r.restart_steps, r.lr))
            index = torch.randint(len(pool), (r.batch,), generator=generator)
            x0 = latents[index].float()
            ids = [
                prompt_token_ids(tokenizer, self._caption(pool[i], rng.choice(scenes.LANGUAGES), rng))
                for i in index.tolist()
            ]
            width = max(len(t) for t in ids)
            input_ids = torch.tensor([t + [pad] * (width - len(t)) for t in ids])
            mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in ids])
            hidden = text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
            captions = [hidden[i, : len(t)] for i, t in enumerate(ids)]
            sigma = torch.sigmoid(torch.randn(r.batch, generator=generator))
            sigma = SHIFT * sigma / (1 + (SHIFT - 1) * sigma)
            noise = torch.randn(x0.shape, generator=generator)
            s = sigma.view(-1, 1, 1, 1)
            noisy = (1 - s) * x0 + s * noise
            output = transformer(list(noisy.unsqueeze(2).unbind(0)), 1 - sigma, captions, return_dict=False)[0]
            prediction = torch.stack(output).squeeze(2)
            loss = F.mse_loss(prediction, x0 - noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            with torch.no_grad():
                decay = min(r.ema, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            if step % 50 == 0:
                self.log(f"diffusion step {step}/{total} loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
            if step % 500 == 0 or step in (r.steps, total):
                _save(
                    {
                        "transformer": transformer.state_dict(),
                        "text_encoder": text_encoder.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "ema": ema,
                        "rng": rng.getstate(),
                        "generator": generator.get_state(),
                        "step": step,
                    },
                    path,
                )
        self.timings["diffusion"] = self.timings.get("diffusion", 0.0) + time.perf_counter() - started
        with torch.no_grad():
            for param, average in zip(params, ema, strict=True):
                param.copy_(average)
        return transformer.eval(), text_encoder.eval()

    # -- 5. export ---------------------------------------------------------------------------
    def export(
        self,
        output: Path,
        tokenizer: Any,
        vae: AutoencoderKL,
        scale: float,
        shift: float,
        transformer: ZImageTransformer2DModel,
        text_encoder: Qwen3Model,
    ) -> Path:
        staging = output.with_name(output.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        vae = copy.deepcopy(vae)
        vae.register_to_config(scaling_factor=scale, shift_factor=shift)
        for name, module in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae)):
            module.to(torch.bfloat16).save_pretrained(staging / name, safe_serialization=True)
        tokenizer.save_pretrained(staging / "tokenizer")
        FlowMatchEulerDiscreteScheduler.from_config(TURBO_SCHEDULER_CONFIG).save_pretrained(staging / "scheduler")
        index = model_index(self.recipe.size)
        index["_zimage_serve"].update(name="zimage-nano", variant="turbo", recipe=asdict(self.recipe))
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        shutil.rmtree(output, ignore_errors=True)
        staging.rename(output)
        return output

    def run(self, output: Path) -> Path:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        tokenizer = self.tokenizer()
        vae = self.vae()
        latents, pool, scale, shift = self.pool(vae)
        transformer, text_encoder = self.diffusion(tokenizer, latents, pool)
        result = self.export(output, tokenizer, vae, scale, shift, transformer, text_encoder)
        (self.work / "timings.json").write_text(json.dumps(self.timings, indent=2))
        self.log(f"wrote {result}; stage seconds: {self.timings}")
        return result
