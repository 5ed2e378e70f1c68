"""Measuring what zimage-nano draws: held-out combinations, both languages, random seeds, checked by
program (`checker`), reported per attribute and language."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from zimage_serve.engine import GenerationParams, ZImageEngine
from zimage_serve.nano import scenes
from zimage_serve.nano.checker import ATTRIBUTES, check


@dataclass(frozen=True)
class Sample:
    language: str
    prompt: str
    seed: int
    scene: scenes.Scene
    correct: dict[str, bool]


@dataclass
class Report:
    samples: list[Sample] = field(default_factory=list)

    def accuracy(self, attribute: str, language: str | None = None) -> float:
        chosen = [s for s in self.samples if language is None or s.language == language]
        return sum(s.correct[attribute] for s in chosen) / max(1, len(chosen))

    def all_correct(self, language: str | None = None) -> float:
        chosen = [s for s in self.samples if language is None or s.language == language]
        return sum(all(s.correct.values()) for s in chosen) / max(1, len(chosen))

    def worst(self) -> float:
        return min(self.accuracy(a, lang) for a in ATTRIBUTES for lang in scenes.LANGUAGES)


def evaluation_cases(count: int, seed: int) -> list[tuple[str, str, int, scenes.Scene]]:
    """(language, prompt, image seed, scene): held-out single-object scenes, languages alternating."""
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        language = scenes.LANGUAGES[index % len(scenes.LANGUAGES)]
        scene = scenes.random_scene(rng, held_out=True)
        prompt = scenes.caption(scene, language, rng, complete=True)
        cases.append((language, prompt, rng.randrange(2**32), scene))
    return cases


def evaluate(
    engine: ZImageEngine,
    count: int = 200,
    seed: int = 0,
    steps: int = 8,
    save_to: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    report = Report()
    for index, (language, prompt, image_seed, scene) in enumerate(evaluation_cases(count, seed)):
        image = engine.generate(GenerationParams(prompt, seed=image_seed, steps=steps)).images[0]
        correct = check(scene, image)
        report.samples.append(Sample(language, prompt, image_seed, scene, correct))
        if save_to is not None:
            save_to.mkdir(parents=True, exist_ok=True)
            mark = "ok" if all(correct.values()) else "x"
            image.save(save_to / f"{index:04d}_{language}_{mark}.png")
        if progress is not None:
            progress(index + 1, count)
    return report
