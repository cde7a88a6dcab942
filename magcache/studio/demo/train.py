"""Train the demo model from scratch on CPU and save it as a diffusers ``FluxPipeline``.

    python -m magcache.studio.demo.train --out assets/demo_model            # the shipped model (fixed seeds)
    python -m magcache.studio.demo.train --export-only --out out/snapshot   # export the latest checkpoint

Stages, each resumed from its checkpoint in ``--work`` (default ``out/demo_train``) if interrupted:
1. ``vae``: a small ``AutoencoderKL`` on rendered scenes (random 64x64 crops, then full 128x128 images).
2. ``latents``: encode ``--num-latents`` training scenes (latent means); the VAE's ``shift_factor`` and
   ``scaling_factor`` come from their statistics.
3. ``transformer``: the FLUX transformer and both text encoders, jointly, with rectified flow
   (x_t = (1-t) x0 + t noise, target noise - x0, logit-normal t), 10% empty captions (for true CFG), EMA weights.
4. ``export``: EMA weights -> ``FluxPipeline.save_pretrained(--out)`` (safetensors) + ``demo_settings.json``.

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
from . import model as M

LOG_EVERY = 25
LATENT_NOISE = 0.1
OBJECT_LOSS_WEIGHT = 4.0
CHECKPOINT_EVERY = 200


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


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


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


def train_vae(work: Path, seed: int, steps: int, batch: int, deadline: float | None) -> torch.nn.Module:
    final = work / "vae_final.pt"
    torch.manual_seed(seed)  # seeded init (overwritten when a trained VAE is loaded)
    vae = M.build_vae()
    if final.exists():
        vae.load_state_dict(torch.load(final)["model"])
        return vae.eval()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    ckpt_path, start = work / "vae_ckpt.pt", 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path)
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
        log(f"vae: resumed at step {start}")
    vae.train()
    t0, running = time.time(), []
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 1e-3, 50)
        x = vae_batch(step, seed, steps, batch)
        gen = torch.Generator().manual_seed(seed * 7919 + step)
        post = vae.encode(x).latent_dist
        # Decode the posterior mean plus a small fixed noise instead of sampling with the posterior std: with
        # ~1000 steps the sampled std stays near 1 and the decoder only learns blur (measured). The KL term
        # still bounds the latent scale; only the mean is ever used (latent caching, the pipeline decodes).
        z = post.mean + LATENT_NOISE * torch.randn(post.mean.shape, generator=gen)
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
        if done % CHECKPOINT_EVERY == 0 or done == steps:
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
@torch.no_grad()
def encode_latents(work: Path, vae: torch.nn.Module, seed: int, count: int, chunk: int = 64) -> dict:
    path = work / "latents.pt"
    scenes = D.training_scenes(count, seed=seed + 1)
    if path.exists():
        cached = torch.load(path)
        if cached["latents"].shape[0] == count:
            # captions always come from the current grammar (scenes, hence latents, do not depend on it)
            cached["captions"] = [s.caption for s in scenes]
            cached.update(scene_arrays(scenes, cached["latents"].shape[-1] // 2))
            return cached
    t0 = time.time()
    means = []
    for i in range(0, count, chunk):
        images = D.render_batch(scenes[i: i + chunk], seed=seed * 1_000_003 + i)
        means.append(vae.encode(_images_to_tensor(images)).latent_dist.mean)
        if (i // chunk) % 50 == 0:
            log(f"latents {i + len(means[-1])}/{count}")
    latents = torch.cat(means)
    shift = latents.mean().item()
    scale = 1.0 / (latents - shift).std().item()
    out = {"latents": latents, "captions": [s.caption for s in scenes], "shift_factor": shift, "scaling_factor": scale}
    out.update(scene_arrays(scenes, latents.shape[-1] // 2))
    _save(out, path)
    log(f"latents: {tuple(latents.shape)} shift {shift:.4f} scale {scale:.4f} in {(time.time() - t0) / 60:.1f} min")
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
class Denoiser(torch.nn.Module):
    """The trained parts in one module (for EMA and checkpoints)."""

    def __init__(self, transformer, text_encoder, text_encoder_2):
        super().__init__()
        self.transformer, self.text_encoder, self.text_encoder_2 = transformer, text_encoder, text_encoder_2

    def forward(self, x_t, t, clip_ids, t5_ids, img_ids, txt_ids):
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        states = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return self.transformer(hidden_states=x_t, timestep=t, pooled_projections=pooled, encoder_hidden_states=states,
                                txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


def _tokenize(components: dict, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    kw = dict(padding="max_length", max_length=M.TEXT_LEN, truncation=True, return_tensors="pt")
    return components["tokenizer"](captions, **kw).input_ids, components["tokenizer_2"](captions, **kw).input_ids


def pack(latents: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents((latents - shift) * scale, b, c, h, w)


def train_transformer(work: Path, components: dict, lat: dict, seed: int, steps: int, batch: int, lr: float,
                      deadline: float | None) -> Denoiser:
    from diffusers import FluxPipeline

    torch.manual_seed(seed + 2)
    fresh = M.build_components()  # seeded init of the trained parts
    net = Denoiser(fresh["transformer"], fresh["text_encoder"], fresh["text_encoder_2"])
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ckpt_path, start = work / "transformer_ckpt.pt", 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path)
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
        log(f"transformer: resumed at step {start}")
    if start >= steps:
        return ema

    x0_all = pack(lat["latents"], lat["shift_factor"], lat["scaling_factor"])  # (N, 64, 16)
    clip_all, t5_all = _tokenize(components, lat["captions"])
    clip_empty, t5_empty = _tokenize(components, [""])
    n = x0_all.shape[0]
    # Binding colours to positions is what is hard (1-object prompts are learned first): scenes are drawn in
    # proportion to their object count, and tokens covered by objects weigh more in the loss.
    sample_weights = lat["num_objects"].float()
    object_tokens = lat["object_tokens"]
    side = int(math.isqrt(x0_all.shape[1]))
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, side, side, "cpu", torch.float32)
    txt_ids = torch.zeros(M.TEXT_LEN, 3)
    log(f"transformer: {sum(p.numel() for p in net.transformer.parameters()) / 1e6:.2f}M params, text encoders "
        f"{sum(p.numel() for p in net.text_encoder.parameters()) / 1e6:.2f}M + "
        f"{sum(p.numel() for p in net.text_encoder_2.parameters()) / 1e6:.2f}M, {n} latents, batch {batch}")
    net.train()
    t0, running = time.time(), []
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, 200)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 17 + step)
        idx = torch.multinomial(sample_weights, batch, replacement=True, generator=gen)
        x0 = x0_all[idx]
        clip_ids, t5_ids = clip_all[idx].clone(), t5_all[idx].clone()
        drop = torch.rand(batch, generator=gen) < 0.1  # empty caption -> unconditional branch for true CFG
        clip_ids[drop], t5_ids[drop] = clip_empty, t5_empty
        t = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        pred = net(x_t, t, clip_ids, t5_ids, img_ids, txt_ids)
        weights = 1.0 + OBJECT_LOSS_WEIGHT * object_tokens[idx].float()  # (B, tokens)
        loss = ((pred - (noise - x0)).pow(2).mean(-1) * weights).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        running.append(loss.item())
        done = step + 1
        if done % LOG_EVERY == 0 or done == steps:
            elapsed = time.time() - t0
            log(f"transformer step {done}/{steps} loss {np.mean(running):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(done - start) / elapsed:.2f} steps/s, {elapsed / 60:.1f} min")
            running = []
        if done % CHECKPOINT_EVERY == 0 or done == steps:
            _save({"model": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": done}, ckpt_path)
        if deadline is not None and time.time() > deadline:
            _save({"model": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": done}, ckpt_path)
            log(f"transformer: time budget reached at step {done}")
            break
    log(f"transformer: stage took {(time.time() - t0) / 60:.1f} min")
    return ema


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


def export(work: Path, out: Path, components: dict, vae: torch.nn.Module, lat: dict, ema: Denoiser,
           settings: dict | None = None) -> None:
    comps = dict(components)
    comps.update(transformer=ema.transformer.eval(), text_encoder=ema.text_encoder.eval(),
                 text_encoder_2=ema.text_encoder_2.eval(), vae=vae.eval())
    vae.register_to_config(shift_factor=round(lat["shift_factor"], 5), scaling_factor=round(lat["scaling_factor"], 5))
    pipe = M.assemble_pipeline(comps)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    meta = json.loads((work / "train_meta.json").read_text()) if (work / "train_meta.json").exists() else {}
    demo = dict(DEFAULT_SETTINGS, **(settings or {}))
    demo["example_prompts"] = [s.caption for s in D.held_out_scenes()[:6]]
    demo["notes"] = ("Prompts follow the training grammar: '<colour> background, <size> <colour> <shape> at <position>, "
                     "...' with up to 3 objects. Example prompts are held-out captions never seen in training.")
    demo["training"] = meta
    settings_path = out / "demo_settings.json"
    if settings_path.exists():  # keep settings chosen later by evaluate.py (cfg scale, steps)
        previous = json.loads(settings_path.read_text())
        for key in DEFAULT_SETTINGS:
            if key in previous and settings is None:
                demo[key] = previous[key]
    settings_path.write_text(json.dumps(demo, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"exported FluxPipeline to {out} ({size / 1e6:.1f} MB)")


def _load_ema_from_checkpoint(work: Path) -> Denoiser:
    fresh = M.build_components()
    net = Denoiser(fresh["transformer"], fresh["text_encoder"], fresh["text_encoder_2"])
    ckpt = torch.load(work / "transformer_ckpt.pt")
    net.load_state_dict(ckpt["ema"])
    log(f"EMA weights of step {ckpt['step']}")
    return net.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/demo_model", help="where the FluxPipeline is saved")
    ap.add_argument("--work", default="out/demo_train", help="checkpoints and cached latents")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1600)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--num-latents", type=int, default=24000)
    ap.add_argument("--steps", type=int, default=4000, help="transformer steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock cap for the whole run; training stops early (and exports) when it is reached")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export-only", action="store_true", help="export the latest checkpoint's EMA weights and exit")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.minutes if args.minutes else None
    components = M.build_components()  # tokenizers and scheduler are used as built; models get replaced

    if args.export_only:
        vae = train_vae(work, args.seed, 0, 1, None)  # loads vae_final.pt
        lat = encode_latents(work, vae, args.seed, args.num_latents)
        export(work, out, components, vae, lat, _load_ema_from_checkpoint(work))
        return

    t_start = time.time()
    meta_path = work / "train_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.update(args={k: v for k, v in vars(args).items() if k not in ("export_only",)})

    t = time.time()
    vae = train_vae(work, args.seed, args.vae_steps, args.vae_batch, deadline)
    meta.setdefault("vae_minutes", round((time.time() - t) / 60, 2))
    t = time.time()
    lat = encode_latents(work, vae, args.seed, args.num_latents)
    meta.setdefault("latents_minutes", round((time.time() - t) / 60, 2))
    meta_path.write_text(json.dumps(meta, indent=2))
    t = time.time()
    ema = train_transformer(work, components, lat, args.seed, args.steps, args.batch, args.lr, deadline)
    meta["transformer_minutes"] = round(meta.get("transformer_minutes_before_resume", 0) + (time.time() - t) / 60, 2)
    meta["total_minutes_this_invocation"] = round((time.time() - t_start) / 60, 2)
    meta["torch_threads"] = args.threads
    meta_path.write_text(json.dumps(meta, indent=2))
    export(work, out, components, vae, lat, ema)


if __name__ == "__main__":
    main()
