"""``python -m magcache generate``: one comparison run of an app tab from the command line, on one process or, under
``torchrun --nproc_per_node N``, on N processes with context parallelism (``--cp ulysses|ring``).

Every rank runs the same code: the app's validation and call arguments (:mod:`magcache.studio.request`, :mod:`magcache.studio.comparison`), a
:class:`~magcache.studio.workers.ParallelModelManager` that switches context parallelism on as it loads, and MagCache
keeping the ranks in step (:mod:`magcache.parallel`). Rank 0 writes the output (PNG or MP4) and prints the timing and
schedule summary as one JSON object (also written to ``--summary`` when given).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from magcache import parallel


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tab", required=True, help="app tab id (flux, wan_t2v, ...; see presets.json)")
    parser.add_argument("--variant", help="variant id of the tab (default: its first)")
    parser.add_argument("--preset", help="MagCache preset id (default: the tab's)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--image", help="input image (image edit, image-to-video tabs)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int, help="number of frames (video tabs)")
    parser.add_argument("--steps", type=int, help="inference steps (default: the tab's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the tab's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thresh", type=float)
    parser.add_argument("--retention", type=float, help="retention ratio")
    parser.add_argument("--K", type=int, help="max consecutive skipped steps")
    parser.add_argument("--baseline", action="store_true", help="also run without MagCache (speed-up, PSNR, SSIM)")
    parser.add_argument("--cp", choices=parallel.CONTEXT_PARALLEL_KINDS,
                        help="context parallelism over the torchrun processes (default ulysses when there are several)")
    parser.add_argument("--tiny", action="store_true", help="tiny offline pipelines (same as MAGCACHE_TINY=1)")
    parser.add_argument("--weights", help="weights override: hub id, diffusers folder or single-file checkpoint")
    parser.add_argument("--base", help="base pipeline for a single-file / transformer-only --weights")
    parser.add_argument("--out", help="output file (default: magcache_<tab>.png / .mp4)")
    parser.add_argument("--summary", help="also write the JSON summary to this file")


def run_generate_command(args: argparse.Namespace) -> int:
    from .catalog import load_catalog
    from .manager import ModelManager
    from .workers import ParallelModelManager

    if args.tiny:
        os.environ["MAGCACHE_TINY"] = "1"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    kind = args.cp or ("ulysses" if world_size > 1 else None)
    catalog = load_catalog()
    tab = catalog.tab(args.tab)
    tab.variant(args.variant)
    created_group = False
    if kind is not None:  # before any process group or model: a model without a plan fails here, saying why
        import torch
        import torch.distributed as dist

        parallel.check_context_parallel(tab.transformer, kind, "cuda" if torch.cuda.is_available() else "cpu")
        if world_size < 2:
            raise ValueError(f"--cp {kind} needs several processes: torchrun --nproc_per_node N -m magcache "
                             "generate ...")
        created_group = not dist.is_initialized()
        rank, world_size, device = parallel.init_process_group()
        manager: ModelManager = ParallelModelManager(catalog, device=device, kind=kind)
    else:
        rank, manager = 0, ModelManager(catalog)
    try:
        return _generate(args, manager, tab, rank, world_size, kind)
    finally:
        if created_group:
            dist.destroy_process_group()


def _generate(args: argparse.Namespace, manager: Any, tab: Any, rank: int, world_size: int, kind: str | None) -> int:
    from .comparison import run_comparison
    from .request import GenerationRequest

    req = GenerationRequest(
        tab_id=tab.id, variant=args.variant, prompt=args.prompt, negative_prompt=args.negative_prompt,
        image=args.image, height=args.height, width=args.width, num_frames=args.frames,
        num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, thresh=args.thresh,
        retention_ratio=args.retention, K=args.K, compare=args.baseline)
    if args.preset:
        req.curve_picker = _preset_curve(args.preset)
    try:
        result = run_comparison(manager, req)
    except AssertionError as e:  # diffusers' sharding asserts instead of raising a message
        if "divisible" in str(e):
            raise ValueError(f"the tokens of this size do not split evenly over {world_size} ranks; choose a height, "
                             "width (and frames) whose latent token count is a multiple of the rank count") from None
        raise
    if rank == 0:
        summary = _summary(result, world_size, kind, manager.device)
        summary["output"] = _write_output(result, args.out or f"magcache_{tab.id}.{'mp4' if tab.is_video else 'png'}")
        text = json.dumps(summary)
        if args.summary:
            Path(args.summary).write_text(text + "\n", encoding="utf-8")
        print(text)
    return 0


def _preset_curve(preset_id: str) -> Any:
    """A curve picker (see ``GenerationRequest.curve_picker``) for another shipped preset's curve and rules."""
    from types import SimpleNamespace

    from magcache.presets import get_preset

    p = get_preset(preset_id)
    return lambda loaded, call: SimpleNamespace(curves=[list(c) for c in p.curves], rules=p.rules, options={},
                                                label=f"preset {p.id}")


def _write_output(result: Any, path: str) -> str:
    from .media import to_pil, write_mp4

    output = result.cached.output
    if result.tab.is_video:
        return write_mp4(output, path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    to_pil(output).save(path)
    return path


def _summary(result: Any, world_size: int, kind: str | None, device: str) -> dict:
    s = result.settings
    out = {
        "tab": result.tab.id, "variant": result.variant.id, "model": result.model, "preset": result.preset,
        "processes": world_size, "context_parallel": kind, "device": device,
        "steps": result.num_steps, "branches": result.num_branches,
        "thresh": s.thresh, "retention_ratio": s.retention_ratio, "K": s.K,
        "magcache_seconds": round(result.cached.seconds, 4),
        "computed": result.cached.stats[-1].computed if result.cached.stats else {},
        "computed_per_branch": {b: c for b, (c, _) in result.cached.branch_counts().items()},
        "predicted": result.predicted.computed,
        "matches_prediction": result.actual_matches_prediction(),
        "predicted_speedup": round(result.predicted_speedup, 4),
        "transformer_calls": result.cached.transformer_calls,
        "warmup_seconds": None if result.warmup_seconds is None else round(result.warmup_seconds, 4),
    }
    if result.baseline is not None:
        out.update(baseline_seconds=round(result.baseline.seconds, 4), speedup=round(result.speedup, 4),
                   psnr=None if result.psnr is None else round(result.psnr, 3),
                   ssim=None if result.ssim is None else round(result.ssim, 5))
    return out
