"""Sample images from validation prompts while training (with the LoRA as trained so far)."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def sample_path(folder: Path, step: int, number: int, prompt: str) -> Path:
    """``<folder>/step-<step>-<n>-<slug>.png``: the sample of prompt ``number`` at ``step``."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"
    return folder / f"step-{step:07d}-{number}-{slug}.png"


def sample_images(
    pipeline,
    prompts: list[str],
    *,
    step: int,
    folder: Path,
    seed: int,
    resolution: int,
    inference_steps: int,
) -> list[Path]:
    """One PNG per prompt, ``step-<step>-<n>-<slug>.png``; same seed each time so steps compare."""
    folder.mkdir(parents=True, exist_ok=True)
    models = [getattr(pipeline, name, None) for name in ("unet", "text_encoder", "text_encoder_2")]
    models = [model for model in models if model is not None]
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    paths = []
    try:
        for number, prompt in enumerate(prompts):
            generator = torch.Generator(device="cpu").manual_seed(seed + number)
            with torch.no_grad():
                image = pipeline(
                    prompt,
                    num_inference_steps=inference_steps,
                    generator=generator,
                    height=resolution,
                    width=resolution,
                    output_type="pil",
                ).images[0]
            path = sample_path(folder, step, number, prompt)
            image.save(path)
            paths.append(path)
    finally:
        for model, mode in zip(models, was_training, strict=True):
            model.train(mode)
    return paths
