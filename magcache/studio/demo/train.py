"""Train the demo model from scratch and save it as a diffusers ``FluxPipeline``.

    python -m magcache.studio.demo.train --recipe gpu --out assets/demo_model   # the shipped model (one GPU, ~8 min)
    python -m magcache.studio.demo.train --recipe cpu --out out/demo_cpu        # 2 CPU cores, ~75 min, a weaker model
    python -m magcache.studio.demo.train --export-only --out out/snapshot       # export the latest checkpoint
    python -m magcache.studio.demo.train --recipe gpu --captions plain ...      # captions in plain English (untrained)

Recipes (``RECIPES``) fix the model size, data and optimisation; any flag overrides its recipe value.

Stages, each resumed from its checkpoint in ``--work`` (default ``out/demo_train``) if interrupted:
1. ``vae``: a small ``AutoencoderKL`` on rendered scenes (random 64x64 crops, then full 128x128 images).
2. ``latents``: encode ``--num-latents`` training scenes (latent means); the VAE's ``shift_factor`` and
   ``scaling_factor`` come from their statistics.
3. ``transformer``: the FLUX transformer and both text encoders, jointly, with rectified flow
   (x_t = (1-t) x0 + t noise, target noise - x0, logit-normal t), 10% empty captions (for true CFG), EMA weights.
4. ``export``: EMA weights -> ``FluxPipeline.save_pretrained(--out)`` (safetensors) + ``demo_settings.json``.

``--captions plain`` trains on plain-English paraphrases (``data.training_caption``: a quarter still in the grammar)
instead of the grammar's captions: ``CAPTION_VARIANTS`` captions per scene drawn at the latent stage (one per sample
at random), scenes with repeated objects for counts and plurals, tokenizers over the paraphrases' words and 48
text tokens (``model.caption_style``).

Every random draw comes from a generator seeded by (seed, stage, step), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from pathlib import Path

# Idle OpenMP threads must sleep, not spin: on a shared 2-core machine spinning threads made steps 5-10x slower
# (measured). Set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from .prompts import PLAIN_ENGLISH_EXAMPLES
from . import model as M

LOG_EVERY = 25
LATENT_NOISE = 0.1
OBJECT_LOSS_WEIGHT = 4.0
WARMUP_STEPS = 200
VAE_CHECKPOINT_EVERY = 200
# --fit-minutes measures the step rate over these transformer steps (inside the warm-up, whose learning rate does
# not depend on the total), then fixes the total: the run equals one started with that --steps.
FIT_WINDOW = (20, 100)
# --captions plain: captions drawn per scene at the latent stage (each sample takes one at random), and the share of
# scenes whose objects are copies of one (data.scene_with_copies), so that counts and plurals have data.
CAPTION_VARIANTS = 4
COPY_SHARE = 0.3

RECIPES = {
    # 2-core CPU, ~75 minutes (VAE 13.5, latents 14.2, transformer 46): adherence 30/50 (docs/demo_model.md)
    "cpu": dict(double_blocks=2, single_blocks=4, num_latents=24_000, steps=4000, batch=64, lr=1e-3, bf16=False,
                checkpoint_every=200, captions="grammar"),
    # one GPU (the shipped model: H200, 7.2 minutes for the transformer at 12.6 steps/s, 49/50): 2 more double blocks,
    # 8x the latents, 16x the batch. The steps are what --fit-minutes chose there. fp32: bf16 autocast failed on that
    # machine in cuDNN's attention backward (torch 2.11 + CUDA 13; bench/demo_gpu.sh's smoke test falls back).
    "gpu": dict(double_blocks=4, single_blocks=4, num_latents=200_000, steps=5254, batch=1024, lr=1e-3, bf16=False,
                checkpoint_every=1000, captions="grammar"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a broken checkpoint


def _images_to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    # uint8 travels to the device; the conversion runs there (4x fewer bytes, and no CPU float pass)
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# --------------------------------------------------------------------------------------------------
# Stage 1: VAE
# --------------------------------------------------------------------------------------------------
def vae_batch(step: int, seed: int, steps: int, batch: int) -> torch.Tensor:
    """Random 64x64 crops for the first 80% of steps (4x cheaper), then full images so that the decoder's group
    norms and the mid-block attention see the real 128x128 layout."""
    rng = random.Random(seed * 1_000_003 + step)
    full = step >= int(0.8 * steps)
    n = max(1, batch // 4) if full else batch
    scenes = [D.random_scene(rng) for _ in range(n)]
    images = np.stack([D.render(s, rng) for s in scenes])
    if not full:
        crops = []
        for img in images:
            y, x = rng.randrange(0, 65), rng.randrange(0, 65)
            crops.append(img[y: y + 64, x: x + 64])
        images = np.stack(crops)
    return _images_to_tensor(images)


def train_vae(work: Path, seed: int, steps: int, batch: int, deadline: float | None,
              device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    final = work / "vae_final.pt"
    torch.manual_seed(seed)  # seeded init (overwritten when a trained VAE is loaded)
    vae = M.build_vae()
    if final.exists():
        vae.load_state_dict(torch.load(final, map_location="cpu")["model"])
        return vae.to(device).eval()
    vae.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    ckpt_path, start = work / "vae_ckpt.pt", 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device)
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
        log(f"vae: resumed at step {start}")
    vae.train()
    t0, running = time.time(), []
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 1e-3, 50)
        x = vae_batch(step, seed, steps, batch).to(device)
        gen = torch.Generator().manual_seed(seed * 7919 + step)
        post = vae.encode(x).latent_dist
        # Decode the posterior mean plus a small fixed noise instead of sampling with the posterior std: with
        # ~1000 steps the sampled std stays near 1 and the decoder only learns blur (measured). The KL term
        # still bounds the latent scale; only the mean is ever used (latent caching, the pipeline decodes).
        z = post.mean + LATENT_NOISE * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        recon = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = recon + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        running.append(recon.item())
        done = step + 1
        if done % LOG_EVERY == 0 or done == steps:
            rate = (done - start) / (time.time() - t0)
            log(f"vae step {done}/{steps} recon {np.mean(running):.4f} latent std {post.mean.std().item():.2f} "
                f"{rate:.2f} steps/s")
            running = []
        if done % VAE_CHECKPOINT_EVERY == 0 or done == steps:
            _save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": done}, ckpt_path)
        if deadline is not None and time.time() > deadline:
            log(f"vae: time budget reached at step {done}")
            break
    _save({"model": vae.state_dict()}, final)
    log(f"vae: done in {(time.time() - t0) / 60:.1f} min")
    return vae.eval()


# --------------------------------------------------------------------------------------------------
# Stage 2: latents of the training scenes
# --------------------------------------------------------------------------------------------------
RENDER_CHUNK = 64  # scenes per render seed (the seeds, hence the images, do not depend on workers or devices)


def _rendered_chunks(scenes: list, seed: int, workers: int):
    """Yield ``(start, images)`` per chunk, rendered in ``workers`` processes (spawned: CUDA may be initialised)."""
    jobs = [(scenes[i: i + RENDER_CHUNK], seed * 1_000_003 + i) for i in range(0, len(scenes), RENDER_CHUNK)]
    if workers <= 1:
        for i, job in enumerate(jobs):
            yield i * RENDER_CHUNK, D.render_batch(*job)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for i, images in enumerate(pool.imap(D.render_batch_job, jobs, chunksize=4)):
            yield i * RENDER_CHUNK, images


@torch.no_grad()
def encode_latents(work: Path, vae: torch.nn.Module, seed: int, count: int, workers: int = 1,
                   encode_batch: int = 64, captions: str = "grammar") -> dict:
    path = work / "latents.pt"
    copy_share = COPY_SHARE if captions == "plain" else 0.0
    scenes = D.training_scenes(count, seed=seed + 1, copy_share=copy_share)
    if path.exists():
        cached = torch.load(path)
        if cached["latents"].shape[0] == count and cached.get("copy_share", 0.0) == copy_share:
            # captions always come from the current grammar (scenes, hence latents, do not depend on it)
            cached.update(scene_captions(scenes, seed, captions))
            cached.update(scene_arrays(scenes, cached["latents"].shape[-1] // 2))
            return cached
    t0 = time.time()
    device = next(vae.parameters()).device
    means, pending = [], []

    def flush() -> None:
        batch = _images_to_tensor(np.concatenate(pending), device)
        means.append(vae.encode(batch).latent_dist.mean.float().cpu())
        pending.clear()

    for start, images in _rendered_chunks(scenes, seed, workers):
        pending.append(images)
        if len(pending) * RENDER_CHUNK >= encode_batch:
            flush()
        if (start // RENDER_CHUNK) % max(1, count // RENDER_CHUNK // 10) == 0:  # about every 10 %
            log(f"latents {start + len(images)}/{count}")
    if pending:
        flush()
    latents = torch.cat(means)
    shift = latents.mean().item()
    scale = 1.0 / (latents - shift).std().item()
    out = {"latents": latents, "shift_factor": shift, "scaling_factor": scale, "copy_share": copy_share}
    out.update(scene_captions(scenes, seed, captions))
    out.update(scene_arrays(scenes, latents.shape[-1] // 2))
    _save(out, path)
    log(f"latents: {tuple(latents.shape)} shift {shift:.4f} scale {scale:.4f} in {(time.time() - t0) / 60:.1f} min")
    return out


def scene_captions(scenes: list, seed: int, captions: str) -> dict:
    """``captions``: the grammar's caption of each scene; with ``plain`` also ``caption_variants``, CAPTION_VARIANTS
    lists of one caption per scene (``data.training_caption``), each list from its own seeded generator."""
    out: dict = {"captions": [s.caption for s in scenes]}
    if captions == "plain":
        out["caption_variants"] = []
        for k in range(CAPTION_VARIANTS):
            rng = random.Random(seed * 1_000_003 + 31 + k)
            out["caption_variants"].append([D.training_caption(s, rng) for s in scenes])
    return out


def scene_arrays(scenes: list, tokens_per_side: int) -> dict:
    """Per scene: its object count, and which packed latent tokens its objects cover (for the loss weights)."""
    px = D.IMAGE_SIZE / tokens_per_side
    masks = torch.zeros(len(scenes), tokens_per_side, tokens_per_side, dtype=torch.bool)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            half = D.SIZES[obj.size] * (1 + D.SIZE_JITTER) / 2 + D.POSITION_JITTER  # largest drawn extent
            cy, cx = (obj.cell[0] + 0.5) * D.CELL, (obj.cell[1] + 0.5) * D.CELL
            r0, r1 = int((cy - half) // px), int((cy + half) // px)
            c0, c1 = int((cx - half) // px), int((cx + half) // px)
            masks[i, max(0, r0): r1 + 1, max(0, c0): c1 + 1] = True
    return {"object_tokens": masks.flatten(1), "num_objects": torch.tensor([len(s.objects) for s in scenes])}


# --------------------------------------------------------------------------------------------------
# Stage 3: transformer + text encoders
# --------------------------------------------------------------------------------------------------
def encode_text(text_encoder, text_encoder_2, clip_ids: torch.Tensor,
                t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``FluxPipeline`` conditions on: the CLIP pooled vector and the T5 token states."""
    pooled = text_encoder(clip_ids, output_hidden_states=False).pooler_output
    states = text_encoder_2(t5_ids, output_hidden_states=False)[0]
    return pooled, states


def predict_velocity(transformer, x_t, t, pooled, states, img_ids, txt_ids) -> torch.Tensor:
    return transformer(hidden_states=x_t, timestep=t, pooled_projections=pooled, encoder_hidden_states=states,
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The rectified-flow point at time ``t``: x_t = (1-t) x0 + t noise (the target velocity is noise - x0)."""
    return (1 - t[:, None, None]) * x0 + t[:, None, None] * noise


class Denoiser(torch.nn.Module):
    """The trained parts in one module (for EMA and checkpoints)."""

    def __init__(self, transformer, text_encoder, text_encoder_2):
        super().__init__()
        self.transformer, self.text_encoder, self.text_encoder_2 = transformer, text_encoder, text_encoder_2

    def forward(self, x_t, t, clip_ids, t5_ids, img_ids, txt_ids):
        pooled, states = encode_text(self.text_encoder, self.text_encoder_2, clip_ids, t5_ids)
        return predict_velocity(self.transformer, x_t, t, pooled, states, img_ids, txt_ids)


def build_denoiser(blocks: dict, captions: str = "grammar") -> Denoiser:
    """Fresh trained parts; ``blocks`` = {"num_layers": double-stream, "num_single_layers": single-stream};
    ``captions``: the caption style (the text encoders' vocabulary and length)."""
    fresh = M.build_components(captions, **blocks)
    return Denoiser(fresh["transformer"], fresh["text_encoder"], fresh["text_encoder_2"])


def _tokenize(components: dict, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    kw = dict(padding="max_length", max_length=components["tokenizer_2"].model_max_length, truncation=True,
              return_tensors="pt")
    return components["tokenizer"](captions, **kw).input_ids, components["tokenizer_2"](captions, **kw).input_ids


def pack(latents: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents((latents - shift) * scale, b, c, h, w)


def save_ema(path: Path, ema: Denoiser, step: int, blocks: dict, lat: dict, captions: str = "grammar") -> None:
    """The exported weights alone (a quarter of a full checkpoint): enough for ``--export-only``."""
    _save({"ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()}, "step": step, "blocks": blocks,
           "captions": captions, "shift_factor": lat["shift_factor"], "scaling_factor": lat["scaling_factor"]}, path)


def make_optimizer(net: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99), fused=device.type == "cuda")


def optimise_step(net: Denoiser, opt: torch.optim.Optimizer, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                  weights: torch.Tensor, inputs: tuple, bf16: bool) -> torch.Tensor:
    """One rectified-flow step: x_t = (1-t) x0 + t noise, target noise - x0, token-weighted MSE. Returns the loss."""
    x_t = noisy_latents(x0, noise, t)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = net(x_t, t, *inputs)
    loss = ((pred.float() - (noise - x0)).pow(2).mean(-1) * weights).sum() / weights.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    return loss.detach()


def smoke_test(device: torch.device, components: dict, blocks: dict, batch: int, bf16: bool, steps: int = 3,
               captions: str = "grammar") -> None:
    """``steps`` of ``train_transformer`` itself on random latents, at the recipe's shapes and batch: does this
    device run them? (bench/demo_gpu.sh tries bf16 first and falls back on failure.) Raises on failure."""
    import tempfile

    scenes = D.training_scenes(256, seed=1)
    side = D.IMAGE_SIZE // 8
    lat = {"latents": torch.randn(len(scenes), M.LATENT_CHANNELS, side, side), "shift_factor": 0.0,
           "scaling_factor": 1.0}
    lat.update(scene_captions(scenes, 0, captions))
    lat.update(scene_arrays(scenes, side // 2))
    with tempfile.TemporaryDirectory() as tmp:
        train_transformer(Path(tmp), components, lat, 0, steps, batch, 1e-4, None, device, blocks, bf16,
                          checkpoint_every=steps, captions=captions)
    log(f"smoke test: {steps} steps at batch {batch}, {'bf16 autocast' if bf16 else 'fp32'} on {device}: ok")


def train_transformer(work: Path, components: dict, lat: dict, seed: int, steps: int, batch: int, lr: float,
                      deadline: float | None, device: torch.device = torch.device("cpu"), blocks: dict | None = None,
                      bf16: bool = False, checkpoint_every: int = 200,
                      fit_seconds: float | None = None, captions: str = "grammar") -> tuple[Denoiser, int]:
    """Returns the EMA weights (on the CPU) and the total step count (fixed by ``fit_seconds`` if given).
    ``captions``: the caption style ``components`` were built for (with ``plain``, ``lat`` holds
    ``caption_variants`` and each sample takes one of them at random)."""
    from diffusers import FluxPipeline

    blocks = blocks or {}
    torch.manual_seed(seed + 2)
    net = build_denoiser(blocks, captions).to(device)  # seeded init of the trained parts
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = make_optimizer(net, lr, device)
    ckpt_path, start = work / "transformer_ckpt.pt", 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device)
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
        if fit_seconds is not None and start >= FIT_WINDOW[0]:  # the total was fitted before the interruption
            steps, fit_seconds = ckpt.get("total_steps", steps), None
        log(f"transformer: resumed at step {start} of {steps}")
    if start >= steps:
        return ema.cpu(), steps

    x0_all = pack(lat["latents"], lat["shift_factor"], lat["scaling_factor"]).to(device)  # (N, 64, 16)
    variants = lat.get("caption_variants") or [lat["captions"]]
    tokenized = [_tokenize(components, v) for v in variants]
    clip_all = torch.stack([c for c, _ in tokenized]).to(device)  # (variants, N, text tokens)
    t5_all = torch.stack([t for _, t in tokenized]).to(device)
    clip_empty, t5_empty = (ids.to(device) for ids in _tokenize(components, [""]))
    n = x0_all.shape[0]
    # Binding colours to positions is what is hard (1-object prompts are learned first): scenes are drawn in
    # proportion to their object count, and tokens covered by objects weigh more in the loss.
    sample_weights = lat["num_objects"].float().to(device)
    object_tokens = lat["object_tokens"].to(device)
    side = int(math.isqrt(x0_all.shape[1]))
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, side, side, device, torch.float32)
    txt_ids = torch.zeros(clip_all.shape[-1], 3, device=device)
    ema_params, net_params = list(ema.parameters()), list(net.parameters())
    log(f"transformer: {sum(p.numel() for p in net.transformer.parameters()) / 1e6:.2f}M params, text encoders "
        f"{sum(p.numel() for p in net.text_encoder.parameters()) / 1e6:.2f}M + "
        f"{sum(p.numel() for p in net.text_encoder_2.parameters()) / 1e6:.2f}M, {n} latents, batch {batch}, "
        f"{device}{' bf16 autocast' if bf16 else ''}")

    def checkpoint(done: int) -> None:
        _save({"model": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": done,
               "total_steps": steps}, ckpt_path)
        save_ema(work / "ema.pt", ema, done, blocks, lat, captions)

    net.train()
    t0, running, t_window = time.time(), [], None
    step = start
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, WARMUP_STEPS)
        gen = torch.Generator(device).manual_seed(seed * 1_000_003 + 17 + step)
        idx = torch.multinomial(sample_weights, batch, replacement=True, generator=gen)
        x0 = x0_all[idx]
        # one caption variant per sample, drawn only when there are several: the grammar recipe's draws stay as
        # they were
        variant = (torch.randint(len(variants), (batch,), generator=gen, device=device) if len(variants) > 1
                   else torch.zeros(batch, dtype=torch.long, device=device))
        clip_ids, t5_ids = clip_all[variant, idx].clone(), t5_all[variant, idx].clone()
        drop = torch.rand(batch, generator=gen, device=device) < 0.1  # empty caption -> uncond branch for true CFG
        clip_ids[drop], t5_ids[drop] = clip_empty, t5_empty
        t = torch.sigmoid(torch.randn(batch, generator=gen, device=device))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        weights = 1.0 + OBJECT_LOSS_WEIGHT * object_tokens[idx].float()  # (B, tokens)
        loss = optimise_step(net, opt, x0, noise, t, weights, (clip_ids, t5_ids, img_ids, txt_ids), bf16)
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, net_params, 1 - decay)
        running.append(loss)  # no .item() per step: it would make the CPU wait for the GPU
        step += 1
        if fit_seconds is not None and step in FIT_WINDOW:
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step == FIT_WINDOW[0]:
                t_window = time.time()
            else:
                rate = (FIT_WINDOW[1] - FIT_WINDOW[0]) / (time.time() - t_window)
                budget = fit_seconds - (time.time() - t0)
                if deadline is not None:
                    budget = min(budget, deadline - time.time() - 30)
                steps = max(step, step + int(rate * budget))
                log(f"transformer: {rate:.1f} steps/s -> --steps {steps} fits {fit_seconds / 60:.1f} minutes")
        if step % LOG_EVERY == 0 or step == steps:
            elapsed = time.time() - t0
            log(f"transformer step {step}/{steps} loss {torch.stack(running).mean().item():.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {(step - start) / elapsed:.2f} steps/s, {elapsed / 60:.1f} min")
            running = []
        if step % checkpoint_every == 0 or step == steps:
            checkpoint(step)
        if deadline is not None and time.time() > deadline:
            checkpoint(step)
            log(f"transformer: time budget reached at step {step}")
            break
    log(f"transformer: stage took {(time.time() - t0) / 60:.1f} min")
    return ema.cpu(), steps


# --------------------------------------------------------------------------------------------------
# Stage 4: export
# --------------------------------------------------------------------------------------------------
DEFAULT_SETTINGS = {
    "height": 128,
    "width": 128,
    "num_inference_steps": 28,
    "true_cfg_scale": 4.0,
    "negative_prompt": "",
    "max_sequence_length": M.TEXT_LEN,
    "seed": 0,
}


def export(work: Path, out: Path, components: dict, vae: torch.nn.Module, shift: float, scale: float, ema: Denoiser,
           settings: dict | None = None, captions: str = "grammar") -> None:
    comps = dict(components)
    comps.update(transformer=ema.transformer.eval(), text_encoder=ema.text_encoder.eval(),
                 text_encoder_2=ema.text_encoder_2.eval(), vae=vae.cpu().eval())
    vae.register_to_config(shift_factor=round(shift, 5), scaling_factor=round(scale, 5))
    pipe = M.assemble_pipeline(comps)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    meta = json.loads((work / "train_meta.json").read_text()) if (work / "train_meta.json").exists() else {}
    demo = dict(DEFAULT_SETTINGS, **(settings or {}))
    demo["example_prompts"] = list(PLAIN_ENGLISH_EXAMPLES) + [s.caption for s in D.held_out_scenes()[:2]]
    demo["notes"] = ("The model was trained on captions of one grammar: '<colour> background, <size> <colour> <shape> at "
                     "<position>, ...' with up to 3 objects. The Demo tab reads plain-English prompts into that grammar "
                     "first (magcache/studio/demo/prompts.py) and shows how it read them. The last two example prompts "
                     "are held-out captions never seen in training.")
    if captions == "plain":
        demo["notes"] = ("The model was trained on plain-English paraphrases of its scenes (data.paraphrase; a quarter "
                         "of the captions in the grammar '<colour> background, <size> <colour> <shape> at <position>, "
                         "...'), up to 3 objects. The last two example prompts are held-out captions never seen in "
                         "training.")
    demo["training"] = meta
    settings_path = out / "demo_settings.json"
    if settings_path.exists():  # keep settings chosen later by evaluate.py (cfg scale, steps)
        previous = json.loads(settings_path.read_text())
        for key in DEFAULT_SETTINGS:
            if key in previous and settings is None:
                demo[key] = previous[key]
    demo["max_sequence_length"] = components["tokenizer_2"].model_max_length  # what the text encoders were built for
    if captions == "plain":  # the Demo tab runs prompts made of these words as typed
        demo["prompt_words"] = list(M.caption_style("plain")[0])
    settings_path.write_text(json.dumps(demo, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"exported FluxPipeline to {out} ({size / 1e6:.1f} MB)")


def _load_ema(work: Path) -> tuple[Denoiser, dict]:
    """EMA weights from ``ema.pt`` (or, for older runs, the full checkpoint) and what export needs beside them."""
    lean = work / "ema.pt"
    ckpt = torch.load(lean if lean.exists() else work / "transformer_ckpt.pt", map_location="cpu")
    net = build_denoiser(ckpt.get("blocks", {}), ckpt.get("captions", "grammar"))
    net.load_state_dict(ckpt["ema"])
    log(f"EMA weights of step {ckpt['step']}")
    return net.eval(), ckpt


def _resolve_recipe(args: argparse.Namespace) -> None:
    """Fill every flag left unset from the chosen recipe."""
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/demo_model", help="where the FluxPipeline is saved")
    ap.add_argument("--work", default="out/demo_train", help="checkpoints and cached latents")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="cpu", help="model size, data and optimisation")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1600)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--num-latents", type=int, default=None)
    ap.add_argument("--double-blocks", type=int, default=None)
    ap.add_argument("--single-blocks", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="transformer steps")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (GPU)")
    ap.add_argument("--checkpoint-every", type=int, default=None)
    ap.add_argument("--captions", choices=M.CAPTION_STYLES, default=None,
                    help="grammar: the caption grammar (the shipped model); plain: plain-English paraphrases")
    ap.add_argument("--fit-minutes", type=float, default=None,
                    help="measure the step rate early and set --steps so that the transformer stage takes this long")
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock cap for the whole run; training stops early (and exports) when it is reached")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--render-workers", type=int, default=1, help="processes rendering the training scenes")
    ap.add_argument("--export-only", action="store_true", help="export the latest EMA weights and exit")
    ap.add_argument("--smoke", action="store_true", help="a few training steps on random data at the recipe's "
                    "shapes (checks the device and precision), then exit")
    ap.add_argument("--blas", choices=("default", "cublaslt"), default="default",
                    help="GEMM library for CUDA (torch.backends.cuda.preferred_blas_library)")
    args = ap.parse_args(argv)
    _resolve_recipe(args)

    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    blocks = {"num_layers": args.double_blocks, "num_single_layers": args.single_blocks}
    components = M.build_components(args.captions)  # tokenizers and scheduler are used as built; models get replaced
    if args.smoke:
        smoke_test(device, components, blocks, args.batch, args.bf16, captions=args.captions)
        return
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.minutes if args.minutes else None

    if args.export_only:
        vae = train_vae(work, args.seed, 0, 1, None)  # loads vae_final.pt
        ema, saved = _load_ema(work)
        components = M.build_components(saved.get("captions", "grammar"))  # the style the weights were trained on
        if "shift_factor" not in saved:  # older checkpoints: the statistics live with the cached latents
            saved = encode_latents(work, vae, args.seed, args.num_latents)
        export(work, out, components, vae, saved["shift_factor"], saved["scaling_factor"], ema,
               captions=saved.get("captions", "grammar"))
        return

    t_start = time.time()
    meta_path = work / "train_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.update(args={k: v for k, v in vars(args).items() if k not in ("export_only",)})
    meta["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta.setdefault("vae_reused", (work / "vae_final.pt").exists() and not (work / "vae_ckpt.pt").exists())

    t = time.time()
    vae = train_vae(work, args.seed, args.vae_steps, args.vae_batch, deadline, device)
    meta.setdefault("vae_minutes", round((time.time() - t) / 60, 2))
    t = time.time()
    lat = encode_latents(work, vae, args.seed, args.num_latents, args.render_workers,
                         encode_batch=1024 if device.type == "cuda" else 64, captions=args.captions)
    meta.setdefault("latents_minutes", round((time.time() - t) / 60, 2))
    meta_path.write_text(json.dumps(meta, indent=2))
    t = time.time()
    ema, steps = train_transformer(work, components, lat, args.seed, args.steps, args.batch, args.lr, deadline, device,
                                   blocks, args.bf16, args.checkpoint_every,
                                   60 * args.fit_minutes if args.fit_minutes else None, args.captions)
    meta["transformer_steps"] = meta["args"]["steps"] = steps  # the fitted total: drop --fit-minutes to repeat it
    meta["transformer_minutes"] = round(meta.get("transformer_minutes_before_resume", 0) + (time.time() - t) / 60, 2)
    meta["total_minutes_this_invocation"] = round((time.time() - t_start) / 60, 2)
    meta["torch_threads"] = args.threads
    meta_path.write_text(json.dumps(meta, indent=2))
    export(work, out, components, vae, lat["shift_factor"], lat["scaling_factor"], ema, captions=args.captions)


if __name__ == "__main__":
    main()
