"""What int8 weight-only quantization does to real images: the trained demo model (``assets/demo_model``, a
FluxPipeline) on the CPU, with and without MagCache, against its float32 uncached output.

    python -m bench.quantization_quality --scenes 16 --json bench/results/cpu_demo_int8_quality.json

Needs torchao (``pip install torchao``). On random-weight models a PSNR/SSIM between quantized and unquantized
outputs says nothing (noise against noise); the demo model is trained, so its images have content and a prompt
adherence check (``magcache.studio.demo.data.check_adherence``). For each held-out scene (seed = its index, as in
``magcache.studio.demo.evaluate``):

* ``float32 + MagCache``: the cache's own error at the demo preset (the reference point);
* ``int8``: quantization alone (MagCache at threshold 0 computes every step and equals the uncached run);
* ``int8 + MagCache``: the stack;

each as PSNR/SSIM against the float32 uncached image, plus adherence counts, and the weights' relative error per
linear layer. Float8 cannot run on a CPU; its error on the GPU is not measured here.
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


def weight_errors(before: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, float]:
    """Relative Frobenius error of each quantized linear layer's weight (dequantized) against its float32 copy."""
    errors = []
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name in before:
            weight = module.weight
            dense = weight.dequantize() if hasattr(weight, "dequantize") else weight
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
    quantize_transformer(pipe.transformer, "int8_weight_only")
    errors = weight_errors(before, pipe.transformer)
    cases["int8"] = run_case(pipe, settings, scenes, reference, **exact)
    cases["int8 + MagCache"] = run_case(pipe, settings, scenes, reference, **preset)
    stack_vs_int8 = [min(psnr(a, b), 100.0) for a, b in zip(cases["int8 + MagCache"]["images"], cases["int8"]["images"])]
    for case in cases.values():
        case.pop("images")
    report = {"model": "assets/demo_model", "scenes": len(scenes), "settings": {k: settings[k] for k in (
        "height", "width", "num_inference_steps", "true_cfg_scale")}, "magcache": settings["magcache"],
        "weight_relative_error": errors, "cases": cases, "int8_magcache_vs_int8_psnr": float(np.mean(stack_vs_int8)),
        "environment": {"torch": torch.__version__, "torchao": torchao.__version__, "machine": platform.machine(),
                        "threads": 1, "clock": "process CPU time"}}
    print(f"int8 weight-only, {errors['layers']} linear layers: relative weight error mean {errors['mean']:.2e}, "
          f"max {errors['max']:.2e}")
    print(f"{'case':<22}{'PSNR dB':>9}{'min':>7}{'SSIM':>8}{'min':>8}{'calls':>8}{'adherence':>11}{'CPU s/img':>11}")
    for name, c in cases.items():
        q = (f"{c['psnr']:9.2f}{c['psnr_min']:7.2f}{c['ssim']:8.4f}{c['ssim_min']:8.4f}" if "psnr" in c
             else f"{'(reference)':>32}")
        print(f"{name:<22}{q}{c['computed_calls']:5.1f}/{c['total_calls']}{c['adherence']:>8}/{len(scenes)}"
              f"{c['cpu_seconds_per_image']:11.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
