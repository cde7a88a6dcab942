"""App-level overhead: time from request to result through the app's backend vs the pipeline's own time.

    python -m bench.app_overhead                  # FLUX tab, mid-size FLUX-shaped transformer (CPU-friendly)
    python -m bench.app_overhead --model tiny     # MAGCACHE_TINY pipeline (Python overhead dominates)
    python -m bench.app_overhead --model demo     # the Demo tab as the app runs it (its model if present)

Each request goes through ``magcache.studio.comparison.run_comparison`` (validation, model manager, device queue,
warm-up, baseline run, MagCache run, PSNR/SSIM/heatmap, predicted schedule), exactly what the UI handler calls.
Pipeline time = the two timed pipeline calls + the warm-up run + model loading, as the backend reports them; the
rest of the wall time is what the app adds. Target: < 5% of the pipeline time. The first request (load, warm-up)
is reported apart from the following ones (median and spread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch


def _mid_flux_pipeline():
    """The tiny FLUX pipeline (tiny text encoders, tiny VAE) with a FLUX-shaped transformer big enough that its
    compute dominates: 2 + 6 blocks, 256 wide, FLUX's RoPE axes; at 64x64 px that is 1024 image tokens."""
    from diffusers import FluxTransformer2DModel

    from magcache.studio.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("flux")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=6, attention_head_dim=128, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(16, 56, 56), guidance_embeds=True,
    ).eval().requires_grad_(False)
    with torch.no_grad():
        for p in transformer.parameters():
            p.mul_(0.05)
    pipe.register_modules(transformer=transformer)
    return pipe


def make_manager(model: str):
    from magcache.studio.manager import LoadedModel, ModelManager

    if model == "tiny":
        return ModelManager(device="cpu", tiny=True), "flux", {}
    if model == "demo":
        return ModelManager(), "demo", {}

    def loader(plan):
        t0 = time.perf_counter()
        pipe = _mid_flux_pipeline()
        pipe.set_progress_bar_config(disable=True)
        size = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
        return LoadedModel(plan, pipe, size, None, time.perf_counter() - t0)

    return ModelManager(device="cpu", tiny=True, loader=loader), "flux", {"height": 64, "width": 64}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.app_overhead", description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("mid", "tiny", "demo"), default="mid")
    ap.add_argument("--requests", type=int, default=4, help="requests in a row (the first one loads and warms up)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from magcache import metrics
    from magcache.metrics import as_array, quality
    from magcache.studio.comparison import run_comparison
    from magcache.studio.request import GenerationRequest

    manager, tab, size = make_manager(args.model)
    req = GenerationRequest(tab_id=tab, prompt="a red circle on a blue background", num_inference_steps=args.steps,
                            seed=0, **size)
    rows = []
    for i in range(args.requests):
        t0 = time.perf_counter()
        res = run_comparison(manager, req)
        wall = time.perf_counter() - t0
        runs = res.cached.seconds + (res.baseline.seconds if res.baseline else 0.0)
        pipeline = runs + (res.warmup_seconds or 0.0) + (res.load_seconds or 0.0)
        # what the metrics part of the overhead costs, measured again outside the request
        t1 = time.perf_counter()
        if res.baseline is not None:
            quality(res.baseline.output, res.cached.output)
            metrics.difference_heatmap(as_array(res.baseline.output), as_array(res.cached.output))
        metrics_s = time.perf_counter() - t1
        row = dict(request=i + 1, wall_s=wall, pipeline_s=pipeline, runs_s=runs, warmup_s=res.warmup_seconds,
                   load_s=res.load_seconds, app_overhead_s=wall - pipeline, app_overhead_share=(wall - pipeline) / pipeline,
                   metrics_s=metrics_s, speedup=res.speedup,
                   computed={b: f"{c}/{t}" for b, (c, t) in res.cached.branch_counts().items()})
        rows.append(row)
        print(f"request {i + 1}: wall {wall:.3f} s, pipeline {pipeline:.3f} s (runs {runs:.3f}, warm-up "
              f"{res.warmup_seconds or 0:.3f}, load {res.load_seconds or 0:.3f}), app adds {wall - pipeline:.3f} s = "
              f"{(wall - pipeline) / pipeline:.2%} (metrics {metrics_s:.3f} s); speed-up {res.speedup:.2f}x, "
              f"computed {row['computed']}", flush=True)
    later = [r["app_overhead_share"] for r in rows[1:]] or [rows[0]["app_overhead_share"]]
    report = {
        "model": args.model,
        "tab": tab,
        "steps": args.steps,
        "device": manager.device,
        "cpu_threads": args.threads,
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "requests": rows,
        "first_request_overhead_share": rows[0]["app_overhead_share"],
        "later_requests_overhead_share_median": statistics.median(later),
        "later_requests_overhead_share_range": [min(later), max(later)],
        "target": "< 5%",
    }
    print(f"app overhead: first request {report['first_request_overhead_share']:.2%}, later requests median "
          f"{report['later_requests_overhead_share_median']:.2%} (range {min(later):.2%} .. {max(later):.2%}); "
          "target < 5%")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
