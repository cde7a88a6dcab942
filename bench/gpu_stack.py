"""The speed stack on one GPU in one call: MagCache + regional compile + float8 weights + an attention backend,
and per-call costs of every architecture. Random weights, full-size models, bare denoising loops (no text encoders,
no VAE), like ``bench/run.py``.

    bash bench/gpu_stack.sh                                # on the device machine (installs carried wheels)
    python -m bench.gpu_stack --smoke                      # the whole script on a CPU at tiny sizes, in seconds
    python -m bench.gpu_stack --render bench/results/gpu_stack_h100.json   # the tables for docs/benchmarks.md

Phases, in this order (``--phases``):

* ``flux``: FLUX.1-dev 1024², 28 steps at the preset's reference settings: eager baseline, MagCache, diffusers'
  built-in MagCache, then regional compile (baseline and MagCache), then the attention backend (``--attention``),
  then float8 weights (``--quantization``, in place with torchao) with and without that backend.
* ``per_call``: for every architecture of ``bench/architectures.py``: a computed call, a head-only call, our
  skipped call and diffusers' skipped call (where each exists), plus a *modelled* wall speed-up at the preset's
  reference settings (predicted schedule x measured per-call costs).
* ``wan``: Wan2.1-T2V-1.3B 480×832×33, 50 steps, real CFG: the same cases as ``flux``.

A time budget (``--budget`` seconds from the start) stops new cases when the next one's estimate would pass it; the
JSON is rewritten after every case, so a run stopped from outside still leaves what it measured. A case that the
hardware or the installation cannot run (float8 below compute capability 8.9, torchao or a kernel package missing,
a model class missing from diffusers, a model larger than the free memory) is recorded as skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from magcache import policy as P
from magcache.presets import get_preset
from magcache.speed import SpeedOptionError, check_attention, check_quantization, quantize_transformer, \
    set_attention_backend, set_compile_mode

from . import architectures, workloads
from .run import Setup, Variant, measure_overhead, timed_run

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("flux", "per_call", "wan")
# rough seconds a case takes on an H100/H200 (from bench/results/gpu_h200_*.json): the budget check uses them
# until the phase's own eager baseline is measured
FULL_RUN_ESTIMATE_S = {"flux": 6.0, "wan": 20.0}
COMPILE_ESTIMATE_S = {"flux": 30.0, "wan": 15.0}
PER_CALL_ESTIMATE_S = 20.0


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate: float) -> bool:
        return self.elapsed() + estimate <= self.seconds


class Report:
    """The results so far, written to ``path`` after every case."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def log(msg: str) -> None:
    print(msg, flush=True)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]


# ---------------------------------------------------------------------------------------------------------------
# Full denoising loops with the stack
# ---------------------------------------------------------------------------------------------------------------
def _warm_up(w: workloads.Workload) -> float:
    """Two calls per branch (compilation happens here); returns the seconds it took."""
    w.sync()
    t = time.perf_counter()
    with torch.inference_mode():
        for _ in range(2):
            for branch in w.branches:
                w.call(w.latents, 1.0, branch)
    w.sync()
    return time.perf_counter() - t


def loop_phase(name: str, w: workloads.Workload, args, budget: Budget, phase: dict[str, Any], report: Report) -> None:
    preset = get_preset(w.preset)
    setup = Setup(w, preset.thresh, preset.retention_ratio, preset.K)
    phase.update(workload=w.description | {"steps": w.num_steps, "branches": list(w.branches)},
                 settings={"preset": w.preset, "thresh": setup.thresh, "retention_ratio": setup.retention_ratio,
                           "K": setup.K}, cases={}, skipped={}, warmups={})
    cases, skipped = phase["cases"], phase["skipped"]
    estimate = {"run": FULL_RUN_ESTIMATE_S[name] * (0.05 if args.smoke else 1.0),
                "compile": COMPILE_ESTIMATE_S[name] * (0.05 if args.smoke else 1.0)}
    state = {"compile": "none", "attention": "native", "quantization": "none"}
    reference: dict[str, torch.Tensor] = {}  # the eager baseline's noise and update

    def run(case: str, variant: str) -> None:
        if not budget.allows(estimate["run"]):
            skipped[case] = "time budget"
            return
        try:
            m = timed_run(Variant(variant, setup))
        except Exception as e:  # noqa: BLE001 - recorded, the next case runs
            skipped[case] = _error(e)
            log(traceback.format_exc(limit=3))
            return
        computed = sum(map(len, m.computed.values()))
        cases[case] = {"time_s": m.seconds, "computed_calls": computed, "total_calls": w.calls_per_run,
                       "computed_steps": m.computed, "peak_mem_bytes": m.peak_bytes, "options": dict(state),
                       "cache": variant, "graphs_compiled_during_timed_run": m.graphs_compiled,
                       "output_finite": bool(torch.isfinite(m.output).all())}
        if case == "eager":
            estimate["run"] = m.seconds * 1.2
            reference["start"] = w.latents.float().cpu()
            reference["update"] = m.output - reference["start"]
        if reference:  # relative RMS difference of the loop's update from the eager baseline's: a sanity check
            # only (random weights say nothing about image quality)
            update = reference["update"]
            diff = (m.output - reference["start"]) - update
            cases[case]["update_rel_rmse_vs_eager"] = float(diff.pow(2).mean().sqrt() / update.pow(2).mean().sqrt())
        base = cases.get("eager", {}).get("time_s")
        cases[case]["speedup_vs_eager"] = base / m.seconds if base else None
        log(f"  {name:<5} {case:<34} {m.seconds:8.3f} s  computed {computed}/{w.calls_per_run}"
            + (f"  {base / m.seconds:5.2f}x" if base else ""))
        report.save()

    def change(what: str, value: str, label: str) -> bool:
        """Switch one option of the model and warm up (compilation happens here); False where it cannot run."""
        if not budget.allows(estimate["compile"] + estimate["run"]):
            skipped[label] = "time budget"
            return False
        previous = state[what]
        try:
            if what == "compile":
                set_compile_mode(w.transformer, value, backend=args.compile_backend)
            elif what == "attention":
                set_attention_backend(w.transformer, value)
            else:
                quantize_transformer(w.transformer, value)
            state[what] = value
            phase["warmups"][label] = _warm_up(w)
        except Exception as e:  # noqa: BLE001 - refused (SpeedOptionError) or failed while compiling: recorded
            skipped[label] = _error(e)
            log(f"  {name:<5} {label}: skipped ({skipped[label]})")
            if what != "quantization":  # back to the state the next cases expect (quantization cannot be undone;
                # nothing after a failed one runs)
                restore = set_compile_mode if what == "compile" else set_attention_backend
                with contextlib.suppress(Exception):
                    restore(w.transformer, previous)
                state[what] = previous
            return False
        log(f"  {name:<5} {label}: warm-up {phase['warmups'][label]:.1f} s")
        return True

    run("eager", "baseline")
    run("magcache", "ours")
    run("diffusers_magcache", "diffusers")
    if change("compile", args.compile_mode, "compile"):
        run("compile", "baseline")
        run("magcache+compile", "ours")
        if change("attention", args.attention, f"attention {args.attention}"):
            run(f"compile+{args.attention}", "baseline")
            run(f"magcache+compile+{args.attention}", "ours")
            change("attention", "native", "attention native")
        if change("quantization", args.quantization, args.quantization):
            run(f"compile+{args.quantization}", "baseline")
            run(f"magcache+compile+{args.quantization}", "ours")
            if state["attention"] == "native" and args.attention != "native" and \
                    change("attention", args.attention, f"{args.quantization} + attention {args.attention}"):
                run(f"magcache+compile+{args.quantization}+{args.attention}", "ours")
    report.save()


# ---------------------------------------------------------------------------------------------------------------
# Per-call costs of every architecture
# ---------------------------------------------------------------------------------------------------------------
def modelled_speedup(costs: dict[str, Any], preset_id: str | None) -> dict[str, Any] | None:
    """Wall speed-up at the preset's reference settings and calibrated step count, *modelled* from measured per-call
    costs: the policy's predicted schedule x (computed calls x full call + skipped calls x our skipped call)."""
    if preset_id is None or costs.get("ours_skip_call_ms") is None:
        return None
    preset = get_preset(preset_id)
    steps, branches = preset.calibrated_steps, len(preset.curves)
    predicted = P.simulate([list(c) for c in preset.curves], steps, preset.settings(), preset.rules, branches)
    computed = sum(map(len, predicted.computed.values()))
    total = steps * branches
    modelled = computed * costs["full_call_ms"] + (total - computed) * costs["ours_skip_call_ms"]
    return {"preset": preset_id, "steps": steps, "branches": branches, "computed_calls": computed,
            "total_calls": total, "speedup": total * costs["full_call_ms"] / modelled}


def per_call_phase(args, device: torch.device, dtype: torch.dtype, budget: Budget, phase: dict[str, Any],
                   report: Report) -> None:
    size = "tiny" if args.smoke else "full"
    names = args.architectures.split(",") if args.architectures else list(architectures.ARCHITECTURES)
    for name in names:
        family, preset, shape = architectures.ARCHITECTURES[name]
        entry: dict[str, Any] = {"family": family, "shape": shape, "preset": preset}
        phase[name] = entry
        if not budget.allows(PER_CALL_ESTIMATE_S * (0.05 if args.smoke else 1.0)):
            entry["skipped"] = "time budget"
            continue
        t0 = time.perf_counter()
        try:
            entry["parameters"] = architectures.parameter_count(name, size)
            need = entry["parameters"] * torch.finfo(dtype).bits // 8
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                if need + args.activation_reserve_gb * 2**30 > free:
                    entry["skipped"] = (f"does not fit: {need / 2**30:.1f} GiB of weights + "
                                        f"{args.activation_reserve_gb} GiB for activations > {free / 2**30:.1f} GiB free")
                    continue
            w = architectures.build(name, size, device, dtype)
            entry["build_s"] = time.perf_counter() - t0
            with torch.inference_mode():  # kernels, allocator
                w.call(w.latents, 1.0, "cond")
            costs = measure_overhead(w, calls=args.per_call_calls, full_calls=2)
            entry.update(costs)
            entry["modelled"] = modelled_speedup(costs, w.preset)
            if device.type == "cuda":
                entry["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
            log(f"  per call {name:<20} full {costs['full_call_ms']:9.2f} ms  head {costs['head_only_call_ms']:7.3f}"
                f"  ours skip {_ms(costs.get('ours_skip_call_ms'))}  diffusers skip "
                f"{_ms(costs.get('diffusers_skip_call_ms'))}"
                + (f"  modelled {entry['modelled']['speedup']:.2f}x" if entry["modelled"] else ""))
        except Exception as e:  # noqa: BLE001 - a missing class, an OOM, a shape this diffusers rejects: recorded
            entry["skipped"] = _error(e)
            log(f"  per call {name:<20} skipped: {entry['skipped']}")
        finally:
            w = None
            _free_memory()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            entry["seconds"] = time.perf_counter() - t0
            report.save()


def _ms(value: float | None) -> str:
    return f"{value:7.3f}" if value is not None else "    n/a"


# ---------------------------------------------------------------------------------------------------------------
# Report tables (docs/benchmarks.md)
# ---------------------------------------------------------------------------------------------------------------
def render_tables(report: dict[str, Any]) -> str:
    """Markdown tables of a result file: the stack per loop phase, then per-call costs per architecture."""
    env = report["environment"]
    lines = [f"Measured on {env.get('gpu', env['device'])}, torch {env['torch']}, diffusers {env['diffusers']}, "
             f"torchao {env.get('torchao') or 'not installed'}, {env['dtype']}"
             + (" (**smoke run: tiny models on a CPU, timings meaningless**)" if report["args"]["smoke"] else "") + "."]
    for name in ("flux", "wan"):
        phase = report["phases"].get(name)
        if not phase or not phase.get("cases"):
            continue
        workload = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in phase["workload"].items())
        settings = phase["settings"]
        lines += ["", f"**{name}**: {workload}; preset `{settings['preset']}` {settings['thresh']} / "
                      f"{settings['retention_ratio']} / {settings['K']}", "",
                  "| case | time s | computed | speed-up vs eager | peak MiB | update rel. RMSE vs eager |",
                  "|---|---|---|---|---|---|"]
        for case, r in phase["cases"].items():
            speedup = f"{r['speedup_vs_eager']:.2f}×" if r.get("speedup_vs_eager") else "–"
            peak = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") else "n/a"
            lines.append(f"| {case} | {r['time_s']:.3f} | {r['computed_calls']}/{r['total_calls']} | {speedup} | "
                         f"{peak} | {r.get('update_rel_rmse_vs_eager', 0.0):.3g} |")
        for case, why in phase.get("skipped", {}).items():
            lines.append(f"| {case} | not measured: {why} | | | | |")
        if phase.get("warmups"):
            lines += ["", "Warm-ups (compilation), s: " + ", ".join(f"{k} {v:.1f}" for k, v in phase["warmups"].items())]
    per_call = report["phases"].get("per_call")
    if per_call:
        lines += ["", "| architecture | shape | full call ms | head only ms | ours skipped ms | diffusers skipped ms | "
                      "modelled speed-up (preset reference settings) |", "|---|---|---|---|---|---|---|"]
        for name, r in per_call.items():
            if "skipped" in r:
                lines.append(f"| {r['family']} | {r['shape']} | not measured: {r['skipped']} | | | | |")
                continue
            model = r.get("modelled")
            modelled = (f"{model['speedup']:.2f}× ({model['computed_calls']}/{model['total_calls']} calls, modelled)"
                        if model else "– (no published ratio curve)")
            lines.append(f"| {r['family']} | {r['shape']} | {r['full_call_ms']:.2f} | {r['head_only_call_ms']:.3f} | "
                         f"{_cell(r.get('ours_skip_call_ms'))} | {_cell(r.get('diffusers_skip_call_ms'))} | {modelled} |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "–"


# ---------------------------------------------------------------------------------------------------------------
def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import importlib.util

    import diffusers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "device": str(device), "dtype": str(dtype).removeprefix("torch."), "machine": platform.machine(),
           "torchao": None}
    if importlib.util.find_spec("torchao") is not None:
        try:
            import torchao

            env["torchao"] = torchao.__version__
        except Exception as e:  # noqa: BLE001 - recorded; the quantized cases then say why they are skipped
            env["torchao"] = f"does not import: {_error(e)}"
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = list(torch.cuda.get_device_capability(device))
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def default_path(env: dict[str, Any], smoke: bool) -> Path:
    name = "smoke_cpu" if smoke else re.sub(r"[^a-z0-9]+", "_", env.get("gpu", env["device"]).lower()).strip("_")
    return RESULTS / f"gpu_stack_{name}.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_stack", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU, few steps: checks the script runs")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, in order (default {','.join(PHASES)})")
    ap.add_argument("--architectures", default=None, help="per_call: comma-separated subset of "
                    + ",".join(architectures.ARCHITECTURES))
    ap.add_argument("--budget", type=float, default=520.0, help="seconds from the start after which no case starts")
    ap.add_argument("--quantization", default=None, help="weights of the quantized cases (magcache.speed; default "
                    "fp8_dynamic, smoke: int8_weight_only)")
    ap.add_argument("--attention", default=None, help="attention backend of the attention cases (default "
                    "_native_cudnn, smoke: native)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled cases")
    ap.add_argument("--compile-backend", default=None, help="default inductor, smoke: aot_eager")
    ap.add_argument("--per-call-calls", type=int, default=None, help="timed calls per kind of call (default 3, smoke: 1)")
    ap.add_argument("--activation-reserve-gb", type=float, default=12.0,
                    help="per_call: skip a model whose weights + this much do not fit the free GPU memory")
    ap.add_argument("--json", default=None, help="where to write the results (default bench/results/gpu_stack_<gpu>.json)")
    ap.add_argument("--render", default=None, metavar="JSON", help="print the markdown tables of a result file, run nothing")
    args = ap.parse_args(argv)
    # smoke: what a CPU runs in seconds (int8 weights with torchao, native attention, aot_eager graphs)
    defaults = (dict(quantization="int8_weight_only", attention="native", compile_backend="aot_eager", per_call_calls=1)
                if args.smoke else
                dict(quantization="fp8_dynamic", attention="_native_cudnn", compile_backend="inductor", per_call_calls=3))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        print(render_tables(json.loads(Path(args.render).read_text())), end="")
        return {}
    budget = Budget(args.budget)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --smoke on a CPU")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        torch.set_num_threads(1)  # tiny models gain nothing from threads on a shared CPU
    # every option change compiles each block class again: keep all of them (FLUX: 3 graphs x 4 states)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    env = environment(device, dtype)
    path = Path(args.json) if args.json else default_path(env, args.smoke)
    report = Report(path, {"args": vars(args), "environment": env, "phases": {}})
    log(f"gpu_stack: {env}; budget {args.budget:.0f} s; results -> {path}")
    for option, check in (("quantization", check_quantization), ("attention", check_attention)):
        try:
            check(getattr(args, option), device)
        except SpeedOptionError as e:
            log(f"note: {option} {getattr(args, option)!r} cannot run here ({e}); its cases will be skipped")
    size = "tiny" if args.smoke else "full"
    for phase_name in args.phases.split(","):
        phase: dict[str, Any] = {}
        report.data["phases"][phase_name] = phase
        log(f"== {phase_name} (at {budget.elapsed():.0f} s)")
        if phase_name == "per_call":
            per_call_phase(args, device, dtype, budget, phase, report)
            continue
        if not budget.allows(FULL_RUN_ESTIMATE_S[phase_name] * (0.05 if args.smoke else 3.0)):
            phase["skipped"] = "time budget"
            continue
        steps = {"flux": 3, "wan": 2}[phase_name] if args.smoke else None
        frames = None if phase_name == "flux" or args.smoke else 33
        try:
            w = workloads.build(phase_name, size, device, steps, dtype, frames=frames)
            with torch.inference_mode():
                w.call(w.latents, 1.0, "cond")  # allocator, kernels, lazy imports
            loop_phase(phase_name, w, args, budget, phase, report)
        except Exception as e:  # noqa: BLE001
            phase["error"] = _error(e)
            log(traceback.format_exc())
        finally:
            w = None
            torch._dynamo.reset()  # compiled code holds the blocks (and their weights) of the last model
            _free_memory()
    report.data["elapsed_s"] = budget.elapsed()
    report.save()
    log("\n" + render_tables(report.data))
    log(f"wrote {path}")
    return report.data


if __name__ == "__main__":
    main(sys.argv[1:])
