"""Train the built-in ``toy`` model from scratch on the synthetic shapes data.

    nice -n 19 python -m server.models.toy.train --out server/models/data/toy

Three stages, all seeded (same flags and thread count give the same weights):

1. Draw ``--images`` synthetic 64x64 images (:mod:`server.models.toy.dataset`).
2. Train the VAE (``AutoencoderKL``, 4 latent channels, /4 downsampling to
   16x16 latents) for ``--vae-steps`` on reconstruction + a tiny KL term, then
   set its ``scaling_factor`` so latents have unit variance.
3. Encode every image once, encode every caption once with the frozen text
   encoder (the factory's seeded random CLIP text encoder of the ``toy`` size:
   color and shape words are different token ids, which is all the UNet needs),
   then train the SD-architecture UNet (epsilon prediction on SD 1.x's noise
   schedule, min-SNR weighting, 10 % empty captions for classifier-free
   guidance, EMA of the weights) for ``--unet-steps``.

``--offset-noise`` adds a random offset per image and latent channel to the
training noise (Guttenberg's offset noise). Without it the noisy input gives
the background away: SD 1.x's schedule leaves signal at its noisiest step
(sqrt(alpha_bar) = 0.068 at t = 999) and a 16x16 latent's per-channel mean
averages the noise down to std 1/16, so white and black backgrounds (3.3
apart in latent mean: 0.22 after scaling) stand out of the noise's mean (0.125
over the 4 channels) at every step. The UNet learns to copy the background
from its input's mean instead of reading the background word, and at sampling
time the seed's noise picks it (the shipped weights: 23 % background accuracy,
see README "The toy model"). ``--init-from FOLDER`` fine-tunes an existing
toy's UNet (its VAE and text encoder kept, no VAE stage); with
``--offset-noise 0.8 --unet-steps 600 --unet-lr 5e-4`` (15 minutes on one
thread) background accuracy went from 23 % to 81 % over 200 images.

``--decoder-steps N`` adds a last stage (:func:`train_decoder`): the VAE
decoder is fine-tuned (its encoder, so every latent, unchanged) to decode
backgrounds gray-neutral, on drawn images and on latents the trained UNet
generates itself. The remaining misses were white backgrounds with a faint
tint: near white, HSL saturation reads 8 levels of 255 as S = 0.25. After
``--decoder-steps 400`` (4 minutes on two threads) over the offset-noise UNet,
background accuracy is 93 % (see README "The toy model").

The result is a diffusers folder (safetensors only, fp16 weights: the fp16
rounding changes no measured accuracy) that ``load_base_model("toy")`` loads.
The shipped weights come from three runs (``training.json`` next to them lists
the commands): the default run with ``--threads 1`` (71 minutes on the shared
2-core development machine; the thread count changes float summation order, so
``--threads 1`` is needed for the same bytes), the offset-noise fine-tune of its
UNet above (``--threads 1``, 15 minutes), and the decoder stage over that
(``--init-from <fine-tuned folder> --unet-steps 0 --decoder-steps 400
--threads 2``, 4 minutes). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from server.models import factory
from server.models import tokenizer as clip
from server.models.toy.dataset import ShapesDataset, all_captions

log = logging.getLogger("server.models.toy.train")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "toy"


@dataclass(frozen=True)
class ToyTrainConfig:
    seed: int = 0
    images: int = 8000
    vae_steps: int = 2500
    vae_batch: int = 8
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    vae_crop: int = 32  # train on random crops (4x cheaper at 32 px); the last 15 % of steps on whole images
    unet_steps: int = 3000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    ema_decay: float = 0.995
    uncond_rate: float = 0.1
    min_snr_gamma: float = 5.0
    threads: int = 2
    save_every: int = 0  # also write the folder every N UNet steps (0: only at the end)
    stop_after: int = 0  # stop the UNet after this many steps of the --unet-steps schedule (0: run it all)
    # Offset noise (Guttenberg 2023): add offset_noise * N(0, 1), one value per image and latent channel,
    # to the training noise, so the noisiest inputs no longer leak each image's mean color (see below).
    offset_noise: float = 0.0
    # Fine-tune: start the UNet from this toy-shaped diffusers folder (or built-in name) and keep its VAE
    # and text encoder (no VAE stage); "" trains all from scratch.
    init_from: str = ""
    # Last stage: fine-tune the VAE decoder (the encoder, so the latents, unchanged) for this many steps
    # on drawn images plus the UNet's own latents (``train_decoder``); 0 skips it.
    decoder_steps: int = 0
    decoder_lr: float = 2e-4
    decoder_latents: int = 192  # latents the UNet generates for it (20 steps, guidance 7.5)
    decoder_neutral: float = 20.0  # weight of the neutral-background terms


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr_factor(step: int, total: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(config: ToyTrainConfig, pixels: torch.Tensor, spec: factory.FactorySpec):
    """Reconstruction (L1 + L2, shape pixels weighted 5x) with a tiny KL term.

    Most of the crops are only background; weighting the high-chroma (shape)
    pixels makes the VAE learn the six hues first, which is what the model is judged on.
    """
    vae = factory.build_vae(spec, config.seed).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.vae_steps))
    generator = torch.Generator().manual_seed(config.seed * 31 + 1)
    started = time.perf_counter()
    for step in range(config.vae_steps):
        full = pixels.shape[-1]
        crop = config.vae_crop if step < 0.85 * config.vae_steps else full
        # Whole-image steps take as many pixels per batch as crop steps do.
        count = (
            config.vae_batch
            if crop != full
            else max(1, round(config.vae_batch * (config.vae_crop / full) ** 2))
        )
        index = torch.randint(0, pixels.shape[0], (count,), generator=generator)
        top, left = (int(v) for v in torch.randint(0, pixels.shape[-1] - crop + 1, (2,), generator=generator))
        batch = pixels[index, :, top : top + crop, left : left + crop]
        weight = 1.0 + 4.0 * (batch.amax(dim=1, keepdim=True) - batch.amin(dim=1, keepdim=True)) / 2.0
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        error = recon - batch
        loss_rec = (weight * (error.abs() + error.pow(2))).mean()
        loss = loss_rec + config.vae_kl * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == config.vae_steps - 1:
            elapsed = time.perf_counter() - started
            log.info("vae step %d/%d rec %.4f (%.0fs)", step + 1, config.vae_steps, loss_rec.item(), elapsed)
    vae.eval().requires_grad_(False)
    return vae


NEUTRAL_CHROMA = 0.03  # a drawn pixel below this chroma (of the [-1, 1] range) is background
GENERATED_NEUTRAL_CHROMA = 0.12  # the same for a decoded pixel of a generated latent (before the fine-tune)
LATENT_SEED = 50000  # prompts and noise of the decoder's generated latents: far from every measure's seeds


def _channel_spread(decoded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the masked pixels from gray (their own channel mean)."""
    spread = decoded - decoded.mean(1, keepdim=True)
    return (mask * spread.pow(2)).sum() / mask.sum().clamp(min=1) / decoded.shape[1]


def _chroma_of(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.amax(1, keepdim=True) - pixels.amin(1, keepdim=True)) / 2


@torch.no_grad()
def generated_latents(pipeline, config: ToyTrainConfig, batch: int = 16) -> torch.Tensor:
    """``config.decoder_latents`` unscaled latents the pipeline's UNet makes from dataset captions."""
    captions = all_captions()
    rng = np.random.default_rng(LATENT_SEED)
    chunks = []
    for start in range(0, config.decoder_latents, batch):
        count = min(batch, config.decoder_latents - start)
        texts = [captions[int(i)] for i in rng.integers(len(captions), size=count)]
        generators = [torch.Generator().manual_seed(LATENT_SEED + start + i) for i in range(count)]
        latents = pipeline(
            texts, num_inference_steps=20, guidance_scale=7.5, generator=generators, output_type="latent"
        ).images
        chunks.append(latents.float() / pipeline.vae.config.scaling_factor)
    return torch.cat(chunks)


def train_decoder(config: ToyTrainConfig, vae, pixels: torch.Tensor, generated: torch.Tensor):
    """Fine-tune the VAE decoder so backgrounds decode gray-neutral, the encoder left as it is.

    Every background in the data is neutral (white, gray, black), but the decoder gave 25 % of
    white ones a faint tint (HSL saturation is very sensitive near white: 8 levels of 255 at
    L = 0.94 read as S = 0.25), and more on the UNet's own latents, which sit a little off the
    encoder's. Each step: the reconstruction loss of ``train_vae`` on drawn images (latents from
    the posterior plus a little noise), plus the channel spread of their background pixels, plus
    the channel spread of the low-chroma pixels decoded from the UNet's generated latents (no
    target needed: whatever is not the shape should be neutral).
    """
    scaling = float(vae.config.scaling_factor)
    with torch.no_grad():
        posteriors = [vae.encode(pixels[i : i + 256]).latent_dist for i in range(0, len(pixels), 256)]
    means = torch.cat([p.mean for p in posteriors])
    stds = torch.cat([p.std for p in posteriors])
    vae.requires_grad_(False).train()
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=config.decoder_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.decoder_steps, warmup=20)
    )
    generator = torch.Generator().manual_seed(config.seed * 31 + 3)
    started = time.perf_counter()
    for step in range(config.decoder_steps):
        index = torch.randint(0, len(pixels), (12,), generator=generator)
        target = pixels[index]
        noise = torch.randn(means[index].shape, generator=generator)
        latents = means[index] + stds[index] * noise
        latents = latents + (0.1 / scaling) * torch.randn(latents.shape, generator=generator)
        decoded = vae.decode(latents).sample
        chroma = _chroma_of(target)
        error = decoded - target
        loss_rec = ((1.0 + 4.0 * chroma) * (error.abs() + error.pow(2))).mean()
        loss_drawn = _channel_spread(decoded, (chroma < NEUTRAL_CHROMA).float())
        picked = generated[torch.randint(0, len(generated), (8,), generator=generator)]
        from_unet = vae.decode(picked).sample
        with torch.no_grad():
            plain = (_chroma_of(from_unet) < GENERATED_NEUTRAL_CHROMA).float()
        loss_generated = _channel_spread(from_unet, plain)
        loss = loss_rec + config.decoder_neutral * (loss_drawn + loss_generated)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == config.decoder_steps - 1:
            log.info(
                "decoder step %d/%d rec %.4f spread %.5f / %.5f (%.0fs)",
                step + 1,
                config.decoder_steps,
                loss_rec.item(),
                loss_drawn.item(),
                loss_generated.item(),
                time.perf_counter() - started,
            )
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def reconstruction_accuracy(vae, seed: int, count: int = 200):
    """Color and shape accuracy of the VAE's reconstructions of images it never saw: the UNet's ceiling."""
    from server.models.toy.measures import accuracy

    images, labels = ShapesDataset(seed=seed + 1000).arrays(0, count)
    decoded = vae.decode(vae.encode(_to_tensor(images)).latent_dist.mean).sample
    pixels = decoded.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return accuracy(
        list(pixels),
        [label.color for label in labels],
        [label.shape for label in labels],
        [label.background for label in labels],
    )


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Posterior means of every image (unscaled)."""
    return torch.cat(
        [vae.encode(pixels[i : i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)]
    )


@torch.no_grad()
def encode_captions(text_encoder, captions: list[str]) -> torch.Tensor:
    tokenizer = clip.clip_tokenizer()
    ids = tokenizer(
        captions, padding="max_length", max_length=clip.MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    return text_encoder(ids.input_ids)[0]


def train_unet(
    config: ToyTrainConfig,
    latents: torch.Tensor,
    caption_index: torch.Tensor,
    embeddings: torch.Tensor,
    uncond: torch.Tensor,
    spec: factory.FactorySpec,
    snapshot=None,
    unet=None,
):
    """Epsilon prediction on SD 1.x's scaled-linear schedule; returns the EMA weights' UNet.

    ``unet``: start from these weights (a fine-tune) instead of the factory's seeded initialization.
    """
    import copy

    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    alphas = noise_schedule.alphas_cumprod
    snr = alphas / (1 - alphas)
    unet = factory.build_unet(spec, config.seed) if unet is None else unet.float()
    unet.train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.unet_steps))
    generator = torch.Generator().manual_seed(config.seed * 31 + 2)
    started = time.perf_counter()
    for step in range(config.stop_after or config.unet_steps):
        index = torch.randint(0, latents.shape[0], (config.unet_batch,), generator=generator)
        clean = latents[index]
        context = embeddings[caption_index[index]].clone()
        drop = torch.rand(config.unet_batch, generator=generator) < config.uncond_rate
        context[drop] = uncond
        noise = torch.randn(clean.shape, generator=generator)
        if config.offset_noise:
            noise = noise + config.offset_noise * torch.randn((*clean.shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(0, 1000, (config.unet_batch,), generator=generator)
        noisy = noise_schedule.add_noise(clean, noise, timesteps)
        predicted = unet(noisy, timesteps, context).sample
        weight = torch.clamp(snr[timesteps], max=config.min_snr_gamma) / snr[timesteps]
        loss = (weight * (predicted - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), unet.parameters(), strict=True):
                ema_param.lerp_(param, 1 - decay)
        if step % 25 == 0 or step == config.unet_steps - 1:
            elapsed = time.perf_counter() - started
            log.info("unet step %d/%d loss %.4f (%.0fs)", step + 1, config.unet_steps, loss.item(), elapsed)
        if snapshot is not None and config.save_every and (step + 1) % config.save_every == 0:
            snapshot(ema, step + 1)
    return ema


def train(config: ToyTrainConfig, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Run all three stages and write the diffusers folder ``out``."""
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(config.threads)
    spec = factory.SPECS["toy"]
    began = time.perf_counter()
    images, labels = ShapesDataset(seed=config.seed).arrays(0, config.images)
    pixels = _to_tensor(images)
    log.info("drew %d images (%.0fs)", config.images, time.perf_counter() - began)

    start_unet = None
    if config.init_from:
        from server.models.loader import load_base_model

        start = load_base_model(config.init_from).pipeline
        vae, start_unet = start.vae.float().eval(), start.unet
        text_encoder = start.text_encoder.float().eval().requires_grad_(False)
        raw = encode_latents(vae, pixels)
        scaling = float(vae.config.scaling_factor)
    else:
        vae = train_vae(config, pixels, spec)
        log.info("vae reconstructions of held-out images: %s", reconstruction_accuracy(vae, config.seed))
        raw = encode_latents(vae, pixels)
        scaling = float(1.0 / raw.std())
        vae.register_to_config(scaling_factor=scaling)
        text_encoder = factory.build_text_encoder(spec, config.seed).requires_grad_(False)
    latents = raw * scaling
    log.info(
        "latents %s, scaling factor %.4f (%.0fs)", tuple(latents.shape), scaling, time.perf_counter() - began
    )

    captions = all_captions()
    embeddings = encode_captions(text_encoder, captions)
    uncond = encode_captions(text_encoder, [""])[0]
    lookup = {caption: i for i, caption in enumerate(captions)}
    caption_index = torch.tensor([lookup[label.caption] for label in labels])

    def pipeline_of(unet):
        import copy

        return StableDiffusionPipeline(
            vae=copy.deepcopy(vae),
            text_encoder=copy.deepcopy(text_encoder),
            tokenizer=clip.clip_tokenizer(),
            unet=copy.deepcopy(unet),
            scheduler=factory.build_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save(unet, step: int) -> None:
        pipeline = pipeline_of(unet)
        pipeline.to(dtype=dtype)
        out.mkdir(parents=True, exist_ok=True)
        pipeline.save_pretrained(str(out), safe_serialization=True)
        seconds = time.perf_counter() - began
        record = {"config": asdict(config), "unet_steps_done": step, "seconds": round(seconds, 1)}
        record["dtype"] = str(dtype)
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        log.info("wrote %s at unet step %d in %.0fs", out, step, seconds)

    unet = train_unet(
        config, latents, caption_index, embeddings, uncond, spec, snapshot=save, unet=start_unet
    )
    if config.decoder_steps:
        sampler = pipeline_of(unet)
        sampler.set_progress_bar_config(disable=True)
        generated = generated_latents(sampler, config)
        log.info("generated %d latents for the decoder (%.0fs)", len(generated), time.perf_counter() - began)
        vae = train_decoder(config, vae, pixels, generated)
        log.info("vae reconstructions of held-out images: %s", reconstruction_accuracy(vae, config.seed))
    save(unet, config.stop_after or config.unet_steps)
    return out


def main() -> None:
    defaults = ToyTrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--fp32", action="store_true", help="keep fp32 weights (default: fp16)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from server.models.noise import quiet_library_noise

    quiet_library_noise()
    config = ToyTrainConfig(**{name: getattr(args, name) for name in asdict(defaults)})
    train(config, args.out, torch.float32 if args.fp32 else torch.float16)


if __name__ == "__main__":
    main()
