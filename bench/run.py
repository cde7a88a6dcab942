"""MagCache benchmark: eager / compiled baseline, our MagCache, diffusers' built-in MagCache, in one process.

    python -m bench.run --model flux --size mid --json out.json
    python -m bench.run --model flux --size full             # on a GPU: FLUX.1-dev shapes, 1024², bf16

Every variant runs the same bare denoising loop (``bench/workloads.py``) on the same random-weight transformer:

=====================  ==========================================================================================
baseline               no cache
ours                   ``magcache.apply`` at the preset's curve and rules with the given thresh/retention/K
ours_matched           ``magcache.apply`` with diffusers' rule set (``<=``, half-up retention, no guard) and its
                       single curve: the same schedule diffusers takes, so times compare implementations only
diffusers              ``transformer.enable_cache(MagCacheConfig(...))`` at the same thresh/retention/K and curve
*_compile              the same after ``magcache.compile_blocks`` (regional ``torch.compile`` of every block)
=====================  ==========================================================================================

Per variant: one untimed warm-up step (plus the compilation warm-up once per compiled phase), then ``--repeats``
timed runs, round-robin over the variants of a phase so a change in machine load hits all of them alike. Reported:
median time and spread, computed steps per branch, speed-up vs the eager baseline (and vs diffusers), time over the
ideal (baseline of the same phase x computed calls / total calls), graphs compiled during the timed runs (must be 0),
cache memory held between calls, and CUDA peak memory (CPU: n/a). ``--overhead`` adds per-call costs: a full call,
a head-only call (block lists empty, no cache), our skipped call and diffusers' skipped call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

import magcache
from magcache import policy as P
from magcache.adapters import adapter_for
from magcache.compile import compile_blocks, uncompile_blocks
from magcache.presets import get_preset
from magcache.runtime import _blocks_left_out

from . import workloads

# diffusers' MagCache rule (hooks/mag_cache.py): skip iff err <= thresh, retention int(R*N + 0.5), no guards
DIFFUSERS_RULES = P.Rules(compare="<=", retention_rounding="half_up")

EAGER_VARIANTS = ("baseline", "diffusers", "ours", "ours_matched")


# ---------------------------------------------------------------------------------------------------------------
# Probes (outside the timed work: a few attribute reads per transformer call)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Probe:
    """Before each call: remembers (step, branch) and samples the bytes the cache holds between calls."""

    cache_bytes: Callable[[], int] = lambda: 0
    current: tuple[int, str] = (0, "cond")
    max_cache_bytes: int = 0
    tail_computes: list[tuple[int, str]] = field(default_factory=list)

    def before_call(self, step: int, branch: str) -> None:
        self.current = (step, branch)
        self.max_cache_bytes = max(self.max_cache_bytes, self.cache_bytes())

    def on_tail_compute(self, *args) -> None:
        self.tail_computes.append(self.current)

    def computed_steps(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for step, branch in self.tail_computes:
            out.setdefault(branch, []).append(step)
        return out


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _tail_module(transformer: torch.nn.Module) -> torch.nn.Module:
    """A submodule inside the last block that every computed block call runs: a pre-hook on it counts the
    computed steps of diffusers' cache (whose hooks replace the blocks' forward, so a hook on the block itself would
    fire on skipped steps too)."""
    last_block = transformer._modules[adapter_for(transformer).block_lists[-1]][-1]
    return next(iter(last_block.children()))


# ---------------------------------------------------------------------------------------------------------------
# Variants: context managers that enable a cache, yield a Probe, and disable it again
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    workload: workloads.Workload
    thresh: float
    retention_ratio: float
    K: int

    @property
    def preset(self):
        return get_preset(self.workload.preset)

    def cond_curve(self) -> list[float]:
        return list(self.preset.curves[0])


class Variant:
    def __init__(self, name: str, setup: Setup):
        self.name, self.setup = name, setup
        self.handle = None

    @contextlib.contextmanager
    def enabled(self) -> Iterator[Probe]:
        w, s = self.setup.workload, self.setup
        t = w.transformer
        kind = self.name.removesuffix("_compile")
        if kind == "baseline":
            yield Probe()
        elif kind in ("ours", "ours_matched"):
            extra = dict(curves=[s.cond_curve()], rules=DIFFUSERS_RULES) if kind == "ours_matched" else {}
            h = magcache.apply(t, w.preset, s.thresh, s.retention_ratio, s.K, num_inference_steps=w.num_steps,
                               num_branches=len(w.branches), **extra)
            self.handle = h

            def held() -> int:  # our state between calls: one residual per branch
                run = h._run
                return _nbytes(*(b.residual for b in run.branches.values())) if run is not None else 0

            try:
                yield Probe(cache_bytes=held)
            finally:
                h.remove()
        elif kind == "diffusers":
            from diffusers.hooks import MagCacheConfig

            t.enable_cache(MagCacheConfig(threshold=s.thresh, max_skip_steps=s.K, retention_ratio=s.retention_ratio,
                                          num_inference_steps=w.num_steps, mag_ratios=s.cond_curve()))
            head_hook = _diffusers_head_hook(t)

            def held() -> int:  # diffusers keeps previous_residual and head_block_input per context
                states = head_hook.state_manager._state_cache.values()
                return sum(_nbytes(st.previous_residual, st.head_block_input) for st in states)

            probe = Probe(cache_bytes=held)
            hook = _tail_module(t).register_forward_pre_hook(probe.on_tail_compute)
            try:
                yield probe
            finally:
                hook.remove()
                t.disable_cache()
        else:
            raise ValueError(self.name)

    def reset(self) -> None:
        """Forget the warm-up's partial run."""
        if self.handle is not None:
            self.handle.reset()
        if hasattr(self.setup.workload.transformer, "_reset_stateful_cache"):
            self.setup.workload.transformer._reset_stateful_cache()


def _diffusers_head_hook(transformer: torch.nn.Module):
    for module in transformer.modules():
        registry = module.__dict__.get("_diffusers_hook")
        hook = registry.get_hook("mag_cache_leader_block_hook") if registry is not None else None
        if hook is not None:
            return hook
    raise RuntimeError("diffusers' MagCache head hook not found")


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------
def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


@dataclass
class Measurement:
    seconds: float  # on the report's clock (see timed_run)
    wall_seconds: float
    cpu_seconds: float
    computed: dict[str, list[int]]
    cache_bytes: int
    peak_bytes: int | None
    graphs_compiled: int
    graph_breaks: int
    output: torch.Tensor


def timed_run(variant: Variant, clock: str = "wall") -> Measurement:
    """One timed run. ``clock="cpu"`` reports the process's CPU time: on a CPU shared with other jobs, with one
    thread, it is the time the run would take alone (wall time then mostly measures the other jobs); both are
    kept."""
    w = variant.setup.workload
    with variant.enabled() as probe:
        # untimed warm-up: one step of calls, then forget its state
        with torch.inference_mode():
            for branch in w.branches:
                w.call(w.latents, 1.0, branch)
        variant.reset()
        probe.tail_computes.clear()
        cuda = w.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(w.device)
            torch.cuda.reset_peak_memory_stats(w.device)
        graphs, breaks = _graphs_compiled(), _graph_breaks()
        w.sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = w.loop(before_call=probe.before_call)
        w.sync()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        peak = torch.cuda.max_memory_allocated(w.device) if cuda else None
        if variant.handle is not None:
            computed = variant.handle.last_run.computed
        elif probe.tail_computes or variant.name.startswith("diffusers"):
            computed = probe.computed_steps()
        else:  # baseline: every call computes
            computed = {b: list(range(w.num_steps)) for b in w.branches}
        primary = cpu_seconds if clock == "cpu" else seconds
        return Measurement(primary, seconds, cpu_seconds, computed, probe.max_cache_bytes, peak, _graphs_compiled() - graphs,
                           _graph_breaks() - breaks, out.float().cpu())


def run_phase(names: list[str], setup: Setup, repeats: int, log, clock: str = "wall") -> dict[str, list[Measurement]]:
    results: dict[str, list[Measurement]] = {n: [] for n in names}
    variants = {n: Variant(n, setup) for n in names}
    for r in range(repeats):
        for n in names:
            m = timed_run(variants[n], clock)
            results[n].append(m)
            log(f"  [{r + 1}/{repeats}] {n:<22} {m.seconds:8.3f} s ({clock}; wall {m.wall_seconds:.3f} s)  computed "
                f"{sum(map(len, m.computed.values()))}")
    return results


# ---------------------------------------------------------------------------------------------------------------
# Per-call overhead: full call, head-only call, our skipped call, diffusers' skipped call
# ---------------------------------------------------------------------------------------------------------------
def _per_call(w: workloads.Workload, calls: int, clock: str = "wall", first_untimed: bool = True) -> list[float]:
    now = time.process_time if clock == "cpu" else time.perf_counter
    times = []
    with torch.inference_mode():
        if first_untimed:
            w.call(w.latents, 1.0, "cond")
        for i in range(calls):
            w.sync()
            t = now()
            w.call(w.latents, 1.0 - i / (calls + 1), "cond")
            w.sync()
            times.append(now() - t)
    return times


def skipped_block_lists(transformer: torch.nn.Module) -> tuple[str, ...]:
    """The block lists a skipped step leaves out: the MagCache adapter's, or for a model without one the top-level
    lists diffusers' own MagCache hooks (``blocks``, ``transformer_blocks``, ``single_transformer_blocks``, ...)."""
    try:
        return adapter_for(transformer).block_lists
    except TypeError:
        from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

        return tuple(name for name, module in transformer.named_children()
                     if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(module, torch.nn.ModuleList))


def measure_overhead(w: workloads.Workload, calls: int = 10, clock: str = "wall", full_calls: int = 3) -> dict[str, Any]:
    """Median per-call costs: a full call, a head-only call (the skipped block lists emptied, no cache), our skipped
    call and diffusers' skipped call. Where a model has no MagCache adapter, or diffusers' MagCache does not support
    it, that call's cost is None and ``*_unavailable`` says why."""
    from diffusers.hooks import MagCacheConfig

    t = w.transformer
    res: dict[str, Any] = {"calls": calls, "clock": clock}
    res["full_call_ms"] = statistics.median(_per_call(w, min(calls, full_calls), clock)) * 1e3
    with _blocks_left_out(t, skipped_block_lists(t)):  # what a skipped step runs, minus the cache
        res["head_only_call_ms"] = statistics.median(_per_call(w, calls, clock)) * 1e3
    res["head_share_of_full_call"] = res["head_only_call_ms"] / res["full_call_ms"]
    try:
        adapter_for(t)
    except TypeError as e:
        res["ours_skip_call_ms"], res["ours_skip_unavailable"] = None, str(e)
    else:  # ours: a run of calls+1 steps that computes step 0 only; the first (untimed) call is that step
        curves = None if w.preset else [[1.0] * (calls + 1)]
        h = magcache.apply(t, w.preset, num_inference_steps=calls + 1, num_branches=1, curves=curves)
        h.configure(computed_steps={"cond": [0]})
        try:
            res["ours_skip_call_ms"] = statistics.median(_per_call(w, calls, clock)) * 1e3
            assert len(h.last_run.computed["cond"]) == 1, h.last_run.summary()
        finally:
            h.remove()
        res["ours_overhead_ms"] = res["ours_skip_call_ms"] - res["head_only_call_ms"]
        res["ours_overhead_share_of_full_call"] = res["ours_overhead_ms"] / res["full_call_ms"]
    try:
        t.enable_cache(MagCacheConfig(threshold=1e9, max_skip_steps=10**6, retention_ratio=0.0,
                                      num_inference_steps=calls + 1, mag_ratios=[1.0] * (calls + 1)))
    except Exception as e:  # diffusers' MagCache knows only the block classes it registered
        res["diffusers_skip_call_ms"], res["diffusers_skip_unavailable"] = None, f"{type(e).__name__}: {e}"
    else:
        try:
            res["diffusers_skip_call_ms"] = statistics.median(_per_call(w, calls, clock)) * 1e3
        finally:
            t.disable_cache()
        res["diffusers_overhead_ms"] = res["diffusers_skip_call_ms"] - res["head_only_call_ms"]
    return res


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def summarize(results: dict[str, list[Measurement]], w: workloads.Workload) -> dict[str, Any]:
    calls_total = w.calls_per_run
    start = w.latents.float().cpu()
    update = results["baseline"][0].output - start  # what the denoising loop added to the noise
    out: dict[str, Any] = {}
    med = {n: statistics.median(m.seconds for m in ms) for n, ms in results.items()}
    for name, ms in results.items():
        times = [m.seconds for m in ms]
        last = ms[-1]
        computed_total = sum(map(len, last.computed.values()))
        base = med["baseline_compile" if name.endswith("_compile") else "baseline"]
        ideal = base * computed_total / calls_total
        diff_name = "diffusers_compile" if name.endswith("_compile") else "diffusers"
        err = ((last.output - start) - update).pow(2).mean().sqrt() / update.pow(2).mean().sqrt()
        out[name] = {
            "time_s": med[name],
            "times_s": times,
            "wall_times_s": [m.wall_seconds for m in ms],
            "cpu_times_s": [m.cpu_seconds for m in ms],
            "spread": (max(times) - min(times)) / med[name] if len(times) > 1 else 0.0,
            "computed": {b: len(v) for b, v in last.computed.items()},
            "computed_steps": last.computed,
            "computed_calls": computed_total,
            "total_calls": calls_total,
            "same_schedule_every_repeat": all(m.computed == last.computed for m in ms),
            "speedup_vs_eager_baseline": med["baseline"] / med[name],
            "speedup_vs_diffusers": (med[diff_name] / med[name]
                                     if diff_name in med and not name.startswith("baseline") else None),
            "ideal_s": ideal,
            "time_over_ideal": med[name] / ideal,
            "graphs_compiled_during_timed_runs": sum(m.graphs_compiled for m in ms),
            "graph_breaks_during_timed_runs": sum(m.graph_breaks for m in ms),
            "cache_bytes_held_max": max(m.cache_bytes for m in ms),
            "peak_mem_bytes": max(m.peak_bytes for m in ms) if last.peak_bytes is not None else None,
            # relative RMS difference of the loop's total update (final - noise) from the eager baseline's: a
            # sanity check only (random weights say nothing about image quality)
            "update_rel_rmse_vs_baseline": float(err),
        }
    for name, r in out.items():  # against the baseline of the same phase (compiled code allocates differently)
        base_peak = out["baseline_compile" if name.endswith("_compile") else "baseline"]["peak_mem_bytes"]
        r["peak_mem_delta_vs_baseline_bytes"] = None if base_peak is None else r["peak_mem_bytes"] - base_peak
    return out


def print_table(variants: dict[str, Any], log) -> None:
    log(f"{'variant':<24}{'time s':>9}{'spread':>8}{'computed':>14}{'speed-up':>9}{'vs diff.':>9}"
        f"{'/ideal':>8}{'compiles':>9}{'cache MiB':>10}{'peak MiB':>10}{'(+delta)':>10}")
    for name, r in variants.items():
        comp = "+".join(str(v) for v in r["computed"].values()) + f"/{r['total_calls']}"
        vs = f"{r['speedup_vs_diffusers']:.2f}x" if r["speedup_vs_diffusers"] else "-"
        delta = r["peak_mem_delta_vs_baseline_bytes"]
        peak = (f"{r['peak_mem_bytes'] / 2**20:>10.0f}{f'({delta / 2**20:+.0f})':>10}" if delta is not None
                else f"{'n/a':>10}{'':>10}")
        log(f"{name:<24}{r['time_s']:9.3f}{r['spread']:8.1%}{comp:>14}{r['speedup_vs_eager_baseline']:8.2f}x{vs:>9}"
            f"{r['time_over_ideal']:8.3f}{r['graphs_compiled_during_timed_runs']:9d}"
            f"{r['cache_bytes_held_max'] / 2**20:10.3f}{peak}")


def environment(w: workloads.Workload, threads: int) -> dict[str, Any]:
    import diffusers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "device": str(w.device), "dtype": str(w.dtype).removeprefix("torch."), "cpu_threads": threads,
           "cpu_count": os.cpu_count(), "machine": platform.machine()}
    if w.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(w.device)
    if hasattr(os, "getloadavg"):
        env["load_avg_start"] = os.getloadavg()
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=workloads.MODELS, default="flux")
    ap.add_argument("--size", choices=workloads.SIZES, default=None, help="default: full on a GPU, mid on a CPU")
    ap.add_argument("--steps", type=int, default=None, help="default: 28 (flux), 50 (wan, hunyuan)")
    ap.add_argument("--thresh", type=float, default=None, help="default: the preset's reference value")
    ap.add_argument("--retention", type=float, default=None)
    ap.add_argument("--K", type=int, default=None)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the *_compile variants (default on; --no-compile skips them)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend for the compiled variants")
    ap.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per variant (median and spread reported)")
    ap.add_argument("--overhead", action=argparse.BooleanOptionalAction, default=True,
                    help="measure per-call costs (head-only / skipped calls)")
    ap.add_argument("--variants", default=None, help="comma-separated subset of variants (eager names; "
                    "their _compile twins run when --compile)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--clock", choices=("wall", "cpu"), default=None, help="what time_s measures: wall (default on a "
                    "GPU) or the process's CPU time (default on a CPU: other jobs on a shared machine barely move it)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 on a CPU — the machine is "
                    "shared and one thread gives steadier timings)")
    ap.add_argument("--resolution", type=int, default=None, help="flux: image side in pixels")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = args.size or ("full" if device.type == "cuda" else "mid")
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)

    t0 = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
    w = workloads.build(args.model, size, device, args.steps, dtype, resolution=args.resolution, frames=args.frames,
                        height=args.height, width=args.width)
    preset = get_preset(w.preset)
    setup = Setup(w, args.thresh if args.thresh is not None else preset.thresh,
                  args.retention if args.retention is not None else preset.retention_ratio,
                  args.K if args.K is not None else preset.K)
    log(f"{args.model}/{size}: {w.description}, {w.num_steps} steps x {len(w.branches)} branch(es), built in "
        f"{time.perf_counter() - t0:.1f} s; preset {w.preset}: thresh {setup.thresh}, retention "
        f"{setup.retention_ratio}, K {setup.K}")
    predicted = P.simulate([list(c) for c in preset.curves], w.num_steps,
                           preset.settings(thresh=setup.thresh, retention_ratio=setup.retention_ratio, K=setup.K),
                           preset.rules, len(w.branches))

    eager = [v for v in EAGER_VARIANTS if args.variants is None or v in args.variants.split(",") or v == "baseline"]
    # global warm-up: allocator, kernels, lazy imports
    with torch.inference_mode():
        for _ in range(2):
            w.call(w.latents, 1.0, "cond")

    log("eager phase")
    clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    results = run_phase(eager, setup, args.repeats, log, clock)
    compile_info: dict[str, Any] = {}
    if args.compile:
        kwargs = {"backend": args.backend} | ({"mode": args.mode} if args.mode else {})
        compiled = compile_blocks(w.transformer, **kwargs)
        graphs, breaks = _graphs_compiled(), _graph_breaks()
        w.sync()
        t = time.perf_counter()
        with torch.inference_mode():  # compilation warm-up: every block class compiles here
            for _ in range(2):
                for branch in w.branches:
                    w.call(w.latents, 1.0, branch)
        w.sync()
        compile_info = {"kwargs": {k: str(v) for k, v in kwargs.items()}, "blocks_compiled": compiled,
                        "warmup_s": time.perf_counter() - t, "graphs_compiled_in_warmup": _graphs_compiled() - graphs,
                        "graph_breaks_in_warmup": _graph_breaks() - breaks}
        log(f"compile phase: {compiled} blocks, warm-up {compile_info['warmup_s']:.1f} s, "
            f"{compile_info['graphs_compiled_in_warmup']} graphs")
        results |= run_phase([v + "_compile" for v in eager], setup, args.repeats, log, clock)
        uncompile_blocks(w.transformer)

    variants = summarize(results, w)
    report: dict[str, Any] = {
        "model": args.model,
        "size": size,
        "workload": w.description | {"steps": w.num_steps, "branches": list(w.branches)},
        "settings": {"preset": w.preset, "thresh": setup.thresh, "retention_ratio": setup.retention_ratio, "K": setup.K,
                     "ours_rules": repr(preset.rules), "ours_matched_rules": repr(DIFFUSERS_RULES)},
        "predicted_ours_computed": {b: len(v) for b, v in predicted.computed.items()},
        "repeats": args.repeats,
        "clock": clock,
        "environment": environment(w, threads),
        "compile": compile_info,
        "variants": variants,
    }
    if "diffusers" in variants and "ours_matched" in variants:
        report["ours_matched_same_schedule_as_diffusers"] = (
            variants["ours_matched"]["computed_steps"] == variants["diffusers"]["computed_steps"])
    if args.overhead:
        report["overhead"] = measure_overhead(w, clock=clock)
    if hasattr(os, "getloadavg"):
        report["environment"]["load_avg_end"] = os.getloadavg()

    log("")
    print_table(variants, log)
    if args.overhead:
        o = report["overhead"]
        log(f"per call: full {o['full_call_ms']:.2f} ms, head only {o['head_only_call_ms']:.3f} ms, ours skipped "
            f"{o['ours_skip_call_ms']:.3f} ms, diffusers skipped {o['diffusers_skip_call_ms']:.3f} ms "
            f"(our overhead {o['ours_overhead_ms']:.3f} ms = {o['ours_overhead_share_of_full_call']:.2%} of a full call)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        log(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
