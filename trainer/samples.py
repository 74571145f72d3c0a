"""Sample images from validation prompts while training (with the LoRA as trained so far)."""

from __future__ import annotations

import re
from pathlib import Path

import torch


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
    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    was_training = unet.training, text_encoder.training
    unet.eval()
    text_encoder.eval()
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
            slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"
            path = folder / f"step-{step:07d}-{number}-{slug}.png"
            image.save(path)
            paths.append(path)
    finally:
        unet.train(was_training[0])
        text_encoder.train(was_training[1])
    return paths
