"""Command line: ``python -m magcache schedule --preset flux --steps 28 [--thresh T] [--retention R] [--K K] [--json]``.

``schedule`` prints the steps each branch computes (0-based) as the runtime would take them, without a model.
``presets`` lists the shipped presets.
``generate --tab TAB --prompt P [--tiny] [--baseline]`` runs one app tab and writes its output and a JSON summary;
under ``torchrun --nproc_per_node N`` with context parallelism over the N processes (``--cp ulysses|ring``; see
``docs/scaling.md``).
``calibrate --tiny KIND | --model-path DIR --steps N [--height H --width W] [--out FILE] [--save]`` measures a
model's ratio curves (see ``docs/tuning.md``); ``--tiny KIND`` uses the studio's tiny offline pipelines, so this
command sits above the library like the app does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import policy as P
from .presets import get_preset, list_presets


def _schedule(args: argparse.Namespace) -> int:
    preset = get_preset(args.preset)
    steps = preset.calibrated_steps if args.steps is None else args.steps
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    settings = preset.settings(thresh=args.thresh, retention_ratio=args.retention, K=args.K,
                               protect_last_steps=args.protect_last or None, sqrt_ratios=args.sqrt or None)
    branches = 1 if args.no_cfg else len(preset.curves) if args.cfg is None else (2 if args.cfg else 1)
    sched = P.simulate(preset.curves, steps, settings, preset.rules, branches)
    if args.json:
        out = {
            "preset": preset.id,
            "steps": steps,
            "thresh": settings.thresh,
            "retention_ratio": settings.retention_ratio,
            "K": settings.K,
            "computed": sched.computed,
            "skipped": sched.skipped,
            "computed_per_branch": {b: len(v) for b, v in sched.computed.items()},
            "predicted_speedup": round(sched.predicted_speedup(), 4),
        }
        print(json.dumps(out))
        return 0
    print(f"{preset.id}: {preset.model}")
    print(f"steps {steps}, thresh {settings.thresh}, retention {settings.retention_ratio}, K {settings.K} "
          f"(rules: {preset.rules_source})")
    for branch, decisions in sched.decisions.items():
        line = "".join("#" if not d.skip else "." for d in decisions)
        n = len(sched.computed[branch])
        print(f"  {branch:>6} {line}  computed {n}/{steps}")
    print(f"  (# computed, . skipped)  predicted block speed-up {sched.predicted_speedup():.2f}x")
    return 0


def _presets(args: argparse.Namespace) -> int:
    rows = [get_preset(p).summary() for p in list_presets()]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            d = r["defaults"]
            adapter = r["family"] or "curve only"
            print(f"{r['id']:<26} {r['calibrated_steps']:>3} steps  thresh {d['thresh']:<5} R {d['retention_ratio']:<4} "
                  f"K {d['K']}  [{adapter}]  {r['model']}")
    return 0


def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--tiny", metavar="KIND", help="a tiny offline random-weight pipeline (flux, wan_t2v, ...)")
    src.add_argument("--model-path", metavar="DIR", help="a diffusers model folder or repo id (already downloaded)")
    parser.add_argument("--pipeline", metavar="CLASS", help="diffusers pipeline class (default: from model_index.json)")
    parser.add_argument("--preset", help="preset recorded with the calibration (default: the model's preset)")
    parser.add_argument("--model", help="model name to key the calibration by "
                        "(default: the resolved --model-path, or tiny:KIND)")
    parser.add_argument("--steps", type=int, required=True, help="number of inference steps")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int, help="number of frames (video models)")
    parser.add_argument("--guidance", type=float, help="guidance_scale")
    parser.add_argument("--prompt", help="prompt (default: the tiny pipelines' prompt, or a generic one)")
    parser.add_argument("--image", help="input image for image-to-video / editing pipelines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weights dtype (--model-path)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--out", metavar="FILE", help="write the calibration JSON to FILE")
    parser.add_argument("--save", action="store_true", help="save into the calibration store")
    parser.add_argument("--store", metavar="DIR", help="calibration store directory (default: see docs/tuning.md)")
    parser.add_argument("--json", action="store_true", help="print the calibration JSON instead of a summary")


def _load_pipeline(args: argparse.Namespace) -> tuple[Any, dict, str]:
    """The pipeline to calibrate: a tiny offline one (built by the studio) or a downloaded diffusers model."""
    import torch

    from .curves import model_id

    if args.tiny:
        from .studio.tiny import build_tiny_pipeline, tiny_call_kwargs

        pipe = build_tiny_pipeline(args.tiny)
        kwargs = tiny_call_kwargs(args.tiny, args.steps, args.seed)
        return pipe, kwargs, f"tiny:{args.tiny}"
    import diffusers

    cls = getattr(diffusers, args.pipeline or "DiffusionPipeline", None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ValueError(f"{args.pipeline!r} is not a diffusers pipeline class")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = cls.from_pretrained(args.model_path, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    kwargs: dict = {"prompt": "a photo of a cat sitting on a wooden table, detailed, natural light",
                    "num_inference_steps": args.steps,
                    "generator": torch.Generator(device="cpu").manual_seed(args.seed)}
    return pipe, kwargs, model_id(pipe)  # the resolved path, as the app keys the same model


def _calibrate(args: argparse.Namespace) -> int:
    """One calibration run, printed and optionally written / saved."""
    from .calibration import CURVE_KEYS, CalibrationStore
    from .measure import calibrate

    if args.steps < 2:
        raise ValueError("--steps must be at least 2")
    pipe, kwargs, default_model = _load_pipeline(args)
    for name, value in (("height", args.height), ("width", args.width), ("num_frames", args.frames),
                        ("guidance_scale", args.guidance), ("prompt", args.prompt)):
        if value is not None:
            kwargs[name] = value
    if args.image:
        from PIL import Image

        kwargs["image"] = Image.open(args.image).convert("RGB")
    cal = calibrate(pipe, kwargs, args.preset, model=args.model or default_model)
    if args.save:
        store = CalibrationStore(args.store)
        cal = store.save(cal)
        print(f"saved {store.path_for(cal.id)}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(cal.to_json(), encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        print(cal.to_json(), end="")
        return 0
    print(f"calibration of {cal.model} (preset {cal.preset}): {cal.num_steps} steps, {cal.resolution.label()}, "
          f"{cal.scheduler}, {'CFG' if cal.cfg else 'no CFG'}, {cal.runs} run(s)")
    for name, curves in cal.branches.items():
        for key in CURVE_KEYS:
            print(f"  {name:>6} {key:<10} {' '.join(f'{v:.4f}' for v in curves[key])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m magcache", description="MagCache schedules and presets")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("schedule", help="print which steps each branch computes")
    s.add_argument("--preset", required=True, help="preset id (python -m magcache presets)")
    s.add_argument("--steps", type=int, help="number of inference steps (default: the preset's calibrated steps)")
    s.add_argument("--thresh", type=float)
    s.add_argument("--retention", type=float, help="retention ratio")
    s.add_argument("--K", type=int, help="max consecutive skipped steps")
    s.add_argument("--protect-last", type=int, default=0, help="always compute the last N steps (our option)")
    s.add_argument("--sqrt", action="store_true", help="sqrt-smoothed ratios as in the paper's evaluation")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--cfg", action="store_true", default=None, help="two branches (cond + uncond)")
    g.add_argument("--no-cfg", action="store_true", help="one branch even for CFG presets")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=_schedule)
    p = sub.add_parser("presets", help="list presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_presets)
    c = sub.add_parser("calibrate", help="run one uncached calibration and print / save its ratio curves")
    _add_calibrate_arguments(c)
    c.set_defaults(func=_calibrate)
    from .studio.generate import add_generate_arguments, run_generate_command

    g = sub.add_parser("generate", help="run one app tab (on N processes under torchrun) and write its output")
    add_generate_arguments(g)
    g.set_defaults(func=run_generate_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
