"""MagCache under context parallelism vs one process, on CPU: two gloo ranks with Ulysses attention, tiny pipelines.

    python -m bench.parallel_cpu            # prints one JSON object

FLUX (true CFG) and Wan (CFG) run with MagCache skipping steps, then a calibration run of each, once on two ranks
(``enable_parallelism(ContextParallelConfig(ulysses_degree=2))``) and once in this process. Printed: the largest
difference of the final latents, whether the schedules are equal (per rank and to the policy's prediction), and the
largest difference of the calibration curves, also for curves measured on each rank's own tokens only (what a
calibration records without the reduction over ranks). This measures correctness only: CPU ranks say nothing about
GPU speed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

WORLD = 2
STEPS = 8
KINDS = ("flux", "wan_t2v")


def library_cases(context_parallel: bool, steps: int = STEPS) -> dict:
    """FLUX (true CFG) and Wan (CFG) with MagCache skipping, then a calibration run of each: final latents, the
    schedule per branch, the decisions, the policy's prediction and the calibration curves."""
    import magcache
    from magcache import parallel
    from magcache.studio.tiny import build_tiny_pipeline, tiny_call_kwargs

    out = {}
    for kind in KINDS:
        pipe = build_tiny_pipeline(kind)
        if context_parallel:
            parallel.enable_context_parallel(pipe.transformer, "ulysses")
        call = tiny_call_kwargs(kind, num_inference_steps=steps)
        if kind == "flux":
            call.update(negative_prompt="blurry", true_cfg_scale=2.0)
        else:
            call.update(height=32, width=32)  # 12 latent tokens: an even split over two ranks
        handle = magcache.apply(pipe, thresh=0.5, K=3)
        result = pipe(**call, output_type="latent")
        run = handle.last_run
        out[kind] = {"latents": result.images if kind == "flux" else result.frames, "computed": run.computed,
                     "decisions": {b: [(d.step, d.skip) for d in s.decisions] for b, s in run.branches.items()},
                     "predicted": handle.predict(steps, len(run.branches)).computed}
        handle.configure(calibrate=True)
        pipe(**dict(call, generator=torch.Generator().manual_seed(1)), output_type="latent")
        out[kind]["calibration"] = handle.calibration()["branches"]
    return out


def spawn_ranks(target: Callable, folder: str, timeout_s: float, world: int = WORLD) -> None:
    """Run ``target(rank, world, port, folder)`` in ``world`` fresh processes; kill them and raise ``TimeoutError``
    if they are not done within ``timeout_s`` (so nothing here can hang a CI job)."""
    import torch.multiprocessing as mp

    from magcache.studio.workers import free_port

    context = mp.start_processes(target, args=(world, free_port(), folder), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} ranks did not finish within {timeout_s:g} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _rank(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from magcache import parallel

    parallel.init_process_group()
    measured = library_cases(True)

    def this_shard_only(self, ratio, distance):  # what a rank would record without the reduction over ranks
        return ratio.mean().item(), ratio.std().item(), distance.mean().item()

    parallel.Lockstep.token_statistics = this_shard_only
    measured["shard_only"] = library_cases(True)
    torch.save(measured, f"{folder}/rank{rank}.pt")


def _largest_difference(a: dict, b: dict) -> float:
    return max(abs(x - y) for branch in a for curve in a[branch] for x, y in zip(a[branch][curve], b[branch][curve]))


def main() -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        spawn_ranks(_rank, folder, timeout_s=300)
        ranks = [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = library_cases(False)
    report = {"machine": f"CPU ({os.cpu_count()} cores), {WORLD} gloo ranks, Ulysses", "torch": torch.__version__,
              "steps": STEPS}
    for kind in KINDS:
        report[kind] = {
            "max_latent_difference": max((r[kind]["latents"] - single[kind]["latents"]).abs().max().item()
                                         for r in ranks),
            "computed": single[kind]["computed"],
            "same_schedule_as_one_process": all(r[kind]["computed"] == single[kind]["computed"] for r in ranks),
            "same_decisions_on_every_rank": all(r[kind]["decisions"] == ranks[0][kind]["decisions"] for r in ranks),
            "schedule_equals_prediction": all(r[kind]["computed"] == r[kind]["predicted"] for r in ranks),
            "max_calibration_difference": max(_largest_difference(r[kind]["calibration"], single[kind]["calibration"])
                                              for r in ranks),
            "max_calibration_difference_one_shard_only": max(
                _largest_difference(r["shard_only"][kind]["calibration"], single[kind]["calibration"]) for r in ranks),
        }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
