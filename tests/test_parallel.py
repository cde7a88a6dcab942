"""MagCache under diffusers context parallelism, on CPU: two ranks over gloo (Ulysses attention), tiny pipelines.

Spawning a rank costs an import of torch and diffusers, so one spawn of two ranks runs every distributed case in
order (the library, the CLI, the app's follower path, then a rank failing inside a model collective, which leaves
that process group unusable and so comes last) and saves what it measured; the tests compare it with one process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.parallel_cpu import STEPS, WORLD, library_cases, spawn_ranks

COLLECTIVE_TIMEOUT_S = 10  # MAGCACHE_CP_TIMEOUT in the ranks: a model collective gives up after this
SPAWN_TIMEOUT_S = 240  # the whole spawn; the test fails (and kills its ranks) instead of hanging CI
FAILING_CALL = 3  # the transformer call during which rank 1 raises in the failure case


def _diverge(rank: int) -> dict:
    """The ranks run with different thresholds, so rank 1 wants to skip a step that rank 0 computes."""
    import magcache
    from magcache import parallel
    from magcache.studio.tiny import build_tiny_pipeline, tiny_call_kwargs

    pipe = build_tiny_pipeline("flux")
    parallel.enable_context_parallel(pipe.transformer, "ulysses")
    magcache.apply(pipe, thresh=0.0 if rank == 0 else 10.0, K=3)
    t0 = time.monotonic()
    try:
        pipe(**tiny_call_kwargs("flux", num_inference_steps=STEPS), output_type="latent")
        error = None
    except parallel.RanksOutOfStep as e:
        error = str(e)
    return {"error": error, "seconds": time.monotonic() - t0}


def _cli_args(tmp: str, tab: str, name: str) -> list[str]:
    return ["generate", "--tab", tab, "--tiny", "--prompt", "a red circle", "--height", "32", "--width", "32",
            "--steps", str(STEPS), "--seed", "5", "--out", f"{tmp}/{name}.png", "--summary", f"{tmp}/{name}.json"]


def _worker_request(**changes):
    from magcache.studio.request import GenerationRequest

    fields = dict(tab_id="wan_t2v", prompt="a red circle", height=32, width=32, num_frames=9,
                  num_inference_steps=STEPS, seed=3, thresh=0.3, compare=False)
    return GenerationRequest(**{**fields, **changes})


def _ranks(rank: int, world: int, port: int, tmp: str) -> None:
    """One rank of the spawn (runs in a fresh process)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), MAGCACHE_CP_TIMEOUT=str(COLLECTIVE_TIMEOUT_S), MAGCACHE_TINY="1")
    torch.set_num_threads(1)
    from magcache import parallel
    from magcache.__main__ import main
    from magcache.studio import workers

    channel, _ = workers.connect(rank, world, port)
    saved: dict = {"library": library_cases(True), "diverged": _diverge(rank)}

    saved["cli_rc"] = main(_cli_args(tmp, "flux", f"cli{rank}"))
    saved["cli_refused_rc"] = main(_cli_args(tmp, "chroma", f"refused{rank}"))

    if rank == 0:
        saved["worker"] = _lead_requests(channel)
    else:
        _follow_with_injected_failure(channel)

    saved["failure"] = _fail_inside_a_collective(rank)
    torch.save(saved, f"{tmp}/rank{rank}.pt")
    os._exit(0)  # the process group is broken by the failure case on purpose: skip its teardown


def _lead_requests(channel) -> dict:
    """Rank 0 of the app: the same request three times around a stopped run and a failure on rank 1."""
    import threading

    from magcache.studio.comparison import run_comparison
    from magcache.studio.manager import Cancelled
    from magcache.studio.workers import ParallelModelManager

    manager = ParallelModelManager(device="cpu", channel=channel)
    out: dict = {}
    first = run_comparison(manager, _worker_request())
    out["first"] = {"output": np.asarray(first.cached.output), "computed": first.cached.stats[-1].computed}

    cancel = threading.Event()

    def stop_at_step_3(phase, done, total):
        if phase == "magcache" and done >= 3:
            cancel.set()

    try:
        run_comparison(manager, _worker_request(), stop_at_step_3, cancel)
        out["stopped"] = "not stopped"
    except Cancelled as e:
        out["stopped"] = str(e)

    channel.store.set("inject-failure", "1")  # rank 1 raises at the end of step 2 of its next run
    t0 = time.monotonic()
    try:
        run_comparison(manager, _worker_request())
        out["failed"] = "no error"
    except RuntimeError as e:
        out["failed"] = str(e)
    out["failed_seconds"] = time.monotonic() - t0

    again = run_comparison(manager, _worker_request())
    out["again"] = {"output": np.asarray(again.cached.output), "computed": again.cached.stats[-1].computed}
    manager.shutdown()
    return out


def _follow_with_injected_failure(channel) -> None:
    from magcache import parallel
    from magcache.studio.workers import ParallelModelManager, follow

    agree_on_step_end = parallel.Lockstep.agree_on_step_end

    def failing_once(self, step):
        if step == 2 and channel.store.check(["inject-failure"]):
            channel.store.delete_key("inject-failure")
            raise RuntimeError("injected failure on rank 1")
        return agree_on_step_end(self, step)

    parallel.Lockstep.agree_on_step_end = failing_once
    follow(ParallelModelManager(device="cpu", follower=True), channel, lambda: True)
    parallel.Lockstep.agree_on_step_end = agree_on_step_end


def _fail_inside_a_collective(rank: int) -> dict:
    """Rank 1 raises inside a transformer call (between attention collectives); rank 0 must not wait forever."""
    import magcache
    from magcache import parallel
    from magcache.studio.tiny import build_tiny_pipeline, tiny_call_kwargs

    pipe = build_tiny_pipeline("flux")
    parallel.enable_context_parallel(pipe.transformer, "ulysses")
    handle = magcache.apply(pipe, thresh=0.0)
    calls = []

    def fail(module, args):
        calls.append(1)
        if len(calls) == FAILING_CALL:
            raise RuntimeError("injected failure inside the transformer")

    if rank == 1:
        pipe.transformer.single_transformer_blocks[0].register_forward_pre_hook(fail)
    lockstep = parallel.lockstep_for(pipe.transformer, handle.adapter.block_lists)
    t0 = time.monotonic()
    try:
        parallel.run_in_lockstep(pipe, lockstep, tiny_call_kwargs("flux", num_inference_steps=STEPS))
        error = None
    except Exception as e:  # noqa: BLE001 - what each rank raised is the result
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "seconds": time.monotonic() - t0}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    try:
        spawn_ranks(_ranks, str(tmp), SPAWN_TIMEOUT_S)
    except TimeoutError as e:
        pytest.fail(str(e))
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process():
    return library_cases(False)


# --------------------------------------------------------------------------------------------------
# The library
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flux", "wan_t2v"])
def test_cached_output_equals_one_process_with_cfg(spawned, one_process, kind):
    _, ranks = spawned
    single = one_process[kind]
    assert set(single["computed"]) == {"cond", "uncond"}
    assert any(len(v) < STEPS for v in single["computed"].values())  # steps were skipped
    for saved in ranks:
        cp = saved["library"][kind]
        assert cp["computed"] == single["computed"]
        torch.testing.assert_close(cp["latents"], single["latents"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["flux", "wan_t2v"])
def test_every_rank_takes_the_predicted_schedule(spawned, kind):
    _, ranks = spawned
    first, second = (saved["library"][kind] for saved in ranks)
    assert first["decisions"] == second["decisions"]
    assert first["computed"] == first["predicted"]


@pytest.mark.parametrize("kind", ["flux", "wan_t2v"])
def test_calibration_under_context_parallelism_equals_one_process(spawned, one_process, kind):
    _, ranks = spawned
    single = one_process[kind]["calibration"]
    for saved in ranks:
        cp = saved["library"][kind]["calibration"]
        assert set(cp) == set(single) == {"cond", "uncond"}
        for branch in single:
            for curve in ("mag_ratios", "mag_std", "cos_dis"):
                assert cp[branch][curve] == pytest.approx(single[branch][curve], abs=2e-5), (branch, curve)


def test_ranks_that_would_take_different_decisions_raise_instead_of_hanging(spawned):
    _, ranks = spawned
    for saved in ranks:
        assert "the ranks disagree at step 1 of 8" in saved["diverged"]["error"]
        assert saved["diverged"]["seconds"] < COLLECTIVE_TIMEOUT_S  # at the agreement, not after a timeout


def test_a_rank_failing_inside_a_collective_does_not_hang_the_other(spawned):
    _, ranks = spawned
    leader, failing = ranks[0]["failure"], ranks[1]["failure"]
    assert "injected failure inside the transformer" in failing["error"]
    assert leader["error"] is not None  # rank 0 raised instead of waiting
    assert leader["seconds"] < COLLECTIVE_TIMEOUT_S + 15


# --------------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------------
def test_cli_under_two_ranks_matches_one_process(spawned, tmp_path):
    from PIL import Image

    from magcache.__main__ import main

    tmp, ranks = spawned
    assert [saved["cli_rc"] for saved in ranks] == [0, 0]
    assert not (tmp / "cli1.png").exists()  # only rank 0 writes
    parallel_summary = json.loads((tmp / "cli0.json").read_text())
    assert parallel_summary["processes"] == 2 and parallel_summary["context_parallel"] == "ulysses"
    assert parallel_summary["matches_prediction"]

    os.environ["MAGCACHE_TINY"] = "1"
    try:
        assert main(_cli_args(str(tmp_path), "flux", "single")) == 0
    finally:
        os.environ.pop("MAGCACHE_TINY")
    single_summary = json.loads((tmp_path / "single.json").read_text())
    assert single_summary["processes"] == 1 and single_summary["context_parallel"] is None
    assert parallel_summary["computed"] == single_summary["computed"]
    a = np.asarray(Image.open(tmp / "cli0.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "single.png"), dtype=int)
    assert np.abs(a - b).max() <= 1


def test_cli_refuses_models_without_a_context_parallel_plan(spawned, capsys):
    from magcache.__main__ import main

    _, ranks = spawned
    assert [saved["cli_refused_rc"] for saved in ranks] == [2, 2]
    assert main(["generate", "--tab", "chroma", "--tiny", "--prompt", "x", "--cp", "ulysses"]) == 2
    assert "ChromaTransformer2DModel has no context-parallel plan" in capsys.readouterr().err


def test_cli_refuses_ring_attention_on_cpu(capsys):
    from magcache.__main__ import main

    assert main(["generate", "--tab", "flux", "--tiny", "--prompt", "x", "--cp", "ring"]) == 2
    assert "ring attention needs" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The app's follower ranks
# --------------------------------------------------------------------------------------------------
def test_a_request_through_the_followers_equals_one_process(spawned):
    from magcache.studio.comparison import run_comparison
    from magcache.studio.manager import ModelManager

    _, ranks = spawned
    worker = ranks[0]["worker"]
    single = run_comparison(ModelManager(device="cpu", tiny=True), _worker_request())
    assert worker["first"]["computed"] == single.cached.stats[-1].computed
    np.testing.assert_allclose(worker["first"]["output"], np.asarray(single.cached.output), atol=1e-4)


def test_stop_and_a_failing_follower_leave_every_rank_clean(spawned):
    _, ranks = spawned
    worker = ranks[0]["worker"]
    assert "stopped at the end of step" in worker["stopped"]
    assert "rank 1: RuntimeError: injected failure on rank 1" in worker["failed"]
    assert worker["failed_seconds"] < COLLECTIVE_TIMEOUT_S  # reported at once, not after a timeout
    assert worker["again"]["computed"] == worker["first"]["computed"]
    np.testing.assert_array_equal(worker["again"]["output"], worker["first"]["output"])

