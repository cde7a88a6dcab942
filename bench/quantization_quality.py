"""What weight quantization does to real images: the trained demo model (``assets/demo_model``, a FluxPipeline) on
the CPU, with and without MagCache, against its float32 uncached output.

    python -m bench.quantization_quality --scenes 50 --json bench/results/cpu_demo_quantization_quality.json

Needs torchao (``pip install torchao``). On random-weight models a PSNR/SSIM between quantized and unquantized
outputs says nothing (noise against noise); the demo model is trained, so its images have content and a prompt
adherence check (``magcache.studio.demo.data.check_adherence``). For each held-out scene (seed = its index, as in
``magcache.studio.demo.evaluate``) and each weight format:

* ``float32 + MagCache``: the cache's own error at the demo preset (the reference point);
* ``<format>``: quantization alone (MagCache at threshold 0 computes every step and equals the uncached run);
* ``<format> + MagCache``: the stack;

each as PSNR/SSIM against the float32 uncached image, plus adherence counts, and the weights' relative error per
linear layer. Formats: ``int8_weight_only`` and ``fp8_weight_only`` through torchao (both run on a CPU), and
``fp8_dynamic`` *emulated*: float8 matrix products need a CUDA GPU, so weights and each linear layer's input are
rounded to float8 (e4m3, one scale per row, torchao's recipe) and multiplied in float32 — the rounding of the real
thing, not its accumulation (Hopper's fast float8 accumulation may add error; not measured).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import magcache
from magcache.metrics import psnr, ssim
from magcache.speed import quantize_transformer
from magcache.studio.demo import data as D
from magcache.studio.demo import evaluate as E


FLOAT8_MAX = torch.finfo(torch.float8_e4m3fn).max


def float8_rowwise(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to float8 e4m3 with one scale per row (last dimension), back in ``t``'s dtype."""
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FLOAT8_MAX
    return ((t.float() / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn).float() * scale).to(t.dtype)


def emulate_fp8_dynamic(transformer: torch.nn.Module) -> None:
    """Every linear layer: float8-rounded weights (per output row) and inputs (per token), float32 products."""
    for module in transformer.modules():
        if isinstance(module, torch.nn.Linear):
            with torch.no_grad():
                module.weight.copy_(float8_rowwise(module.weight))
            module.register_forward_pre_hook(lambda mod, args: (float8_rowwise(args[0]), *args[1:]))


def weight_errors(before: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, float]:
    """Relative Frobenius error of each quantized linear layer's weight (dequantized) against its float32 copy."""
    errors = []
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name in before:
            weight = module.weight
            dense = (weight.dequantize() if hasattr(weight, "dequantize") else weight).detach()
            errors.append(float((dense.float() - before[name]).norm() / before[name].norm()))
    return {"layers": len(errors), "mean": float(np.mean(errors)), "max": float(np.max(errors))}


def run_case(pipe, settings: dict, scenes, reference: list[np.ndarray] | None, **magcache_settings) -> dict[str, Any]:
    handle = magcache.apply(pipe, **magcache_settings)
    images, computed, seconds = [], [], []
    try:
        for i, scene in enumerate(scenes):
            t = time.process_time()
            images.append(E.generate(pipe, scene.caption, i, settings))
            seconds.append(time.process_time() - t)
            computed.append(sum(map(len, handle.last_run.computed.values())))
    finally:
        handle.remove()
    result: dict[str, Any] = {
        "computed_calls": float(np.mean(computed)),
        "total_calls": settings["num_inference_steps"] * (2 if settings["true_cfg_scale"] > 1 else 1),
        "cpu_seconds_per_image": float(np.mean(seconds)),
        "adherence": sum(D.check_adherence(image, scene)["correct"] for image, scene in zip(images, scenes)),
        "images": images,
    }
    if reference is not None:
        ps = [min(psnr(a, b), 100.0) for a, b in zip(images, reference)]
        ss = [ssim(a, b) for a, b in zip(images, reference)]
        result.update(psnr=float(np.mean(ps)), psnr_min=float(np.min(ps)), ssim=float(np.mean(ss)),
                      ssim_min=float(np.min(ss)))
    return result


FORMATS = ("int8_weight_only", "fp8_weight_only", "fp8_dynamic (emulated)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.quantization_quality", description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=16, help="held-out scenes (the first N)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import torchao

    pipe, settings = E.load_pipeline()
    scenes = D.held_out_scenes()[: args.scenes]
    preset = dict(preset="demo")  # the demo preset's reference settings (threshold, K, retention)
    exact = dict(preset="demo", thresh=0.0)  # computes every step: equal to the uncached run
    cases: dict[str, dict[str, Any]] = {}
    cases["float32"] = run_case(pipe, settings, scenes, None, **exact)
    reference = cases["float32"]["images"]
    cases["float32 + MagCache"] = run_case(pipe, settings, scenes, reference, **preset)
    before = {n: m.weight.detach().float().clone() for n, m in pipe.transformer.named_modules()
              if isinstance(m, torch.nn.Linear)}
    errors: dict[str, dict[str, float]] = {}
    stack_vs_alone: dict[str, float] = {}
    for fmt in FORMATS:
        pipe, _ = E.load_pipeline()  # quantization is in place: a fresh float32 model each time
        if fmt == "fp8_dynamic (emulated)":
            emulate_fp8_dynamic(pipe.transformer)
        else:
            quantize_transformer(pipe.transformer, fmt)
        errors[fmt] = weight_errors(before, pipe.transformer)
        cases[fmt] = run_case(pipe, settings, scenes, reference, **exact)
        cases[f"{fmt} + MagCache"] = run_case(pipe, settings, scenes, reference, **preset)
        stack_vs_alone[fmt] = float(np.mean([min(psnr(a, b), 100.0) for a, b in zip(
            cases[f"{fmt} + MagCache"]["images"], cases[fmt]["images"])]))
        print(f"{fmt}, {errors[fmt]['layers']} linear layers: relative weight error mean {errors[fmt]['mean']:.2e}, "
              f"max {errors[fmt]['max']:.2e}", flush=True)
    for case in cases.values():
        case.pop("images")
    report = {"model": "assets/demo_model", "scenes": len(scenes), "settings": {k: settings[k] for k in (
        "height", "width", "num_inference_steps", "true_cfg_scale")}, "magcache": settings["magcache"],
        "weight_relative_error": errors, "cases": cases, "format_magcache_vs_format_psnr": stack_vs_alone,
        "environment": {"torch": torch.__version__, "torchao": torchao.__version__, "machine": platform.machine(),
                        "threads": 1, "clock": "process CPU time"}}
    print(f"{'case':<32}{'PSNR dB':>9}{'min':>7}{'SSIM':>8}{'min':>8}{'calls':>8}{'adherence':>11}{'CPU s/img':>11}")
    for name, c in cases.items():
        q = (f"{c['psnr']:9.2f}{c['psnr_min']:7.2f}{c['ssim']:8.4f}{c['ssim_min']:8.4f}" if "psnr" in c
             else f"{'(reference)':>32}")
        print(f"{name:<32}{q}{c['computed_calls']:5.1f}/{c['total_calls']}{c['adherence']:>8}/{len(scenes)}"
              f"{c['cpu_seconds_per_image']:11.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
