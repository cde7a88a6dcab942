"""MagCache under diffusers context parallelism (one transformer call split over N processes by tokens).

With ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` every rank runs the whole
pipeline on a shard of the image/video tokens, and the attention layers exchange tokens with all-to-all (Ulysses)
or all-gather (ring) collectives. Two things must hold for MagCache there:

* **Every rank takes the same decision at every call.** A rank that skips while another computes would leave the
  other waiting in an attention collective forever. Decisions come only from values that are identical on every rank
  (the ratio curve, the settings, the step counter), and :meth:`Lockstep.agree` checks it before every transformer
  call: one all-reduce of a few integers over a gloo group of the same ranks, with a timeout, so a rank that
  diverged, failed or stopped makes every rank raise instead of hanging.
* **Calibration measures the whole latent, not a shard.** The per-token ratio and cosine distance are reduced over
  the ranks (sums of ratio, ratio², cosine distance and token counts), so every rank records the curve one process
  would record (:meth:`Lockstep.token_statistics`).

Where the model splits its tokens matters for the cached residual: FLUX and FLUX.2 split the transformer's inputs, so
the stack input is already a shard; Wan and Qwen-Image split at the first block's input, which a skipped step never
runs, so the stack input is sharded here the same way (:meth:`Lockstep.shard_stack_input`).

The runtime (``magcache/runtime.py``) calls :func:`lockstep_for` once per run; everything here is inactive for a
transformer without a context-parallel configuration.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch

CONTEXT_PARALLEL_KINDS = ("ulysses", "ring")
DEFAULT_TIMEOUT_S = 600.0  # a rank may wait this long for the others (the leader decodes the output meanwhile)

# The control vector every rank contributes to each agreement, reduced with MAX.
_RUNNING, _FINISHED, _FAILED, _STOP, _CHECK, _NEG_CHECK = range(6)
_NEUTRAL = -(1 << 62)  # a finished rank's check value: below every real one, so it never wins the MAX
_STEP_END = 1 << 40  # step-end agreements use check values of their own, never equal to a transformer call's


class RanksOutOfStep(RuntimeError):
    """The ranks of a context-parallel run did not agree (different decision, step or run) or did not answer in
    time; every rank that noticed raised this instead of waiting in a collective."""


class PeerFailed(RuntimeError):
    """Another rank of the context-parallel run raised an error; this rank stopped at the same point."""


class RunStopped(RuntimeError):
    """A stop was requested on one rank; every rank stopped at the same step."""


def timeout_seconds() -> float:
    """``MAGCACHE_CP_TIMEOUT`` (seconds), else :data:`DEFAULT_TIMEOUT_S`: how long a collective of the model waits
    for the other ranks."""
    value = os.environ.get("MAGCACHE_CP_TIMEOUT")
    return float(value) if value else DEFAULT_TIMEOUT_S


def control_timeout_seconds() -> float:
    """How long the ranks wait for each other in the agreements: twice a model collective's timeout, so a rank that
    failed is still waiting when the others' collective has timed out and they come to the same agreement."""
    return 2 * timeout_seconds()


# --------------------------------------------------------------------------------------------------
# Which transformers can run context parallel
# --------------------------------------------------------------------------------------------------
def supports_context_parallel(transformer_cls: type | str) -> bool:
    """Whether diffusers ships a context-parallel plan (``_cp_plan``) for this transformer class."""
    if isinstance(transformer_cls, str):
        import diffusers

        transformer_cls = getattr(diffusers, transformer_cls)
    return getattr(transformer_cls, "_cp_plan", None) is not None


def check_context_parallel(transformer_cls: type | str, kind: str, device: str) -> None:
    """``ValueError`` with what to do when ``transformer_cls`` cannot run ``kind`` context parallelism on
    ``device`` ("cpu", "cuda", "cuda:1", ...)."""
    name = transformer_cls if isinstance(transformer_cls, str) else transformer_cls.__name__
    if kind not in CONTEXT_PARALLEL_KINDS:
        raise ValueError(f"context parallelism must be one of {', '.join(CONTEXT_PARALLEL_KINDS)}, got {kind!r}")
    if not supports_context_parallel(transformer_cls):
        import diffusers

        raise ValueError(
            f"{name} has no context-parallel plan in diffusers {diffusers.__version__}, so it cannot run on several "
            "GPUs at once; run it on one GPU (or run one replica per GPU).")
    if kind == "ring" and not str(device).startswith("cuda"):
        raise ValueError("ring attention needs an attention backend that returns the log-sum-exp (flash or cuDNN), "
                         "which only exists on GPUs; use ulysses on a CPU")


@contextlib.contextmanager
def _one_device_per_cpu_rank() -> Iterator[None]:
    """diffusers 0.42.1 places rank r on ``torch.device(type, r % torch.accelerator.device_count())``, which divides
    by zero on a machine without an accelerator: there every rank uses the CPU, so count one device while the
    parallel configuration is built."""
    if torch.accelerator.is_available():
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_context_parallel(transformer: torch.nn.Module, kind: str = "ulysses", degree: int | None = None) -> None:
    """``transformer.enable_parallelism`` with ``kind`` ("ulysses" or "ring") over ``degree`` ranks (default: all
    ranks of the initialised process group), after checking that the model and the device support it."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; launch with torchrun (or init_process_group first)")
    device = next(transformer.parameters()).device
    check_context_parallel(type(transformer), kind, device.type)
    degree = dist.get_world_size() if degree is None else degree
    if degree < 2:
        raise ValueError(f"context parallelism needs at least 2 ranks, got {degree}")
    with _one_device_per_cpu_rank():
        transformer.enable_parallelism(config=ContextParallelConfig(**{f"{kind}_degree": degree}))


def init_process_group(store: Any = None, rank: int | None = None,
                       world_size: int | None = None) -> tuple[int, int, str]:
    """Join the process group that torchrun's environment describes (or ``store``, ``rank`` and ``world_size``): NCCL
    with one GPU per local rank where CUDA exists, else gloo on CPUs. Returns ``(rank, world_size, device)``.
    Collectives time out after :func:`timeout_seconds` instead of waiting forever for a rank that died."""
    import torch.distributed as dist

    given = {} if store is None else dict(store=store, rank=rank, world_size=world_size)
    timeout = timedelta(seconds=timeout_seconds())
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if store is None else rank
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
        if not dist.is_initialized():
            dist.init_process_group("nccl", timeout=timeout, device_id=torch.device(device), **given)
    else:
        device = "cpu"
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timeout, **given)
    return dist.get_rank(), dist.get_world_size(), device


# --------------------------------------------------------------------------------------------------
# Keeping the ranks in step
# --------------------------------------------------------------------------------------------------
_CONTROL_GROUPS: dict[tuple[int, ...], Any] = {}


def control_group(ranks: Sequence[int]) -> Any:
    """A gloo group of ``ranks`` for the small host-side agreements (created once per set of ranks; only those
    ranks take part in creating it). Host-side on purpose: checking a decision never waits for the GPU."""
    import torch.distributed as dist

    key = tuple(sorted(ranks))
    group = _CONTROL_GROUPS.get(key)
    if group is None:
        timeout = timedelta(seconds=control_timeout_seconds())
        group = dist.new_group(list(key), backend="gloo", timeout=timeout, use_local_synchronization=True)
        _CONTROL_GROUPS[key] = group
    return group


class Lockstep:
    """The ranks of one context-parallel transformer: agreements before each call, reduced calibration statistics,
    and the stack input's shard where the model splits tokens inside the block stack."""

    def __init__(self, transformer: torch.nn.Module, block_lists: Sequence[str]):
        import torch.distributed as dist

        config = transformer._parallel_config.context_parallel_config
        self.config = config
        self.group = config._flattened_mesh.get_group()
        self.ranks = dist.get_process_group_ranks(self.group)
        self.rank = dist.get_rank()
        self.timeout = timedelta(seconds=control_timeout_seconds())
        self.control = control_group(self.ranks)
        self.stop_requested: Callable[[], bool] = lambda: False
        self._split = _split_inside_stack(transformer, block_lists)

    # ---- agreements --------------------------------------------------------------------------------
    def _exchange(self, values: list[int], what: str) -> list[int]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control, async_op=True).wait(self.timeout)
        except RuntimeError as e:
            raise RanksOutOfStep(
                f"rank {self.rank}: the other ranks ({', '.join(map(str, self.ranks))}) did not reach {what} within "
                f"{self.timeout.total_seconds():g} s (a rank failed or stalled): {e}") from None
        return t.tolist()

    def agree(self, check: int, what: str) -> None:
        """Before a transformer call (or at a step end): raise on every rank unless every rank is at the same point
        with the same ``check`` value; raise :class:`RunStopped` on every rank if any rank asked to stop."""
        r = self._exchange([1, 0, 0, int(bool(self.stop_requested())), check, -check], what)
        if r[_FAILED]:
            raise PeerFailed(f"rank {self.rank}: another rank failed; stopped at {what}")
        if r[_FINISHED] or r[_CHECK] != -r[_NEG_CHECK]:
            raise RanksOutOfStep(f"rank {self.rank}: the ranks disagree at {what} (another rank is at a different "
                                 "step, run or decision); stopped every rank instead of hanging")
        if r[_STOP]:
            raise RunStopped(f"stopped at {what}")

    def agree_on_decision(self, num_steps: int, step: int, branch: int, skip: bool) -> None:
        self.agree(((num_steps * 4096 + step) * 16 + branch) * 2 + int(skip),
                   f"step {step} of {num_steps}, branch {branch} ({'skip' if skip else 'compute'})")

    def agree_on_step_end(self, step: int) -> None:
        self.agree(_STEP_END + step, f"the end of step {step}")

    def finish(self, failed: bool) -> bool:
        """After a run on this rank ended (``failed``: by an exception): answer the other ranks' agreements until
        every rank has finished, so none is left waiting. Returns whether any rank failed."""
        any_failed = failed
        while True:
            r = self._exchange([0, 1, int(failed), 0, _NEUTRAL, _NEUTRAL], "the end of the run")
            any_failed = any_failed or bool(r[_FAILED])
            if not r[_RUNNING]:
                return any_failed

    # ---- tokens ------------------------------------------------------------------------------------
    def shard_stack_input(self, entry: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the block stack's input where the model splits it inside the stack (identity
        where the transformer's inputs are split before it)."""
        if self._split is None:
            return entry
        from diffusers.hooks.context_parallel import EquipartitionSharder, PartitionAnythingSharder

        mesh = self.config._flattened_mesh
        if self.config.ulysses_anything or self.config.ring_anything:
            return PartitionAnythingSharder.shard_anything(entry, self._split.split_dim, mesh)
        return EquipartitionSharder.shard(entry, self._split.split_dim, mesh)

    def token_statistics(self, ratio: torch.Tensor, distance: torch.Tensor) -> tuple[float, float, float]:
        """Mean and (unbiased) standard deviation of the per-token ``ratio`` and mean of ``distance`` over the
        tokens of every rank: what one process computes over the whole latent."""
        import torch.distributed as dist

        r = ratio.double().flatten()
        sums = torch.stack([r.sum(), (r * r).sum(), distance.double().sum(),
                            torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device)])
        dist.all_reduce(sums, group=self.group)
        total, squares, distances, n = sums.tolist()
        mean = total / n
        variance = max(squares - total * mean, 0.0) / (n - 1) if n > 1 else 0.0
        return mean, variance**0.5, distances / n


def _split_inside_stack(transformer: torch.nn.Module, block_lists: Sequence[str]) -> Any:
    """The split of ``hidden_states`` when the context-parallel plan splits it at a block of the stack (Wan, Qwen-Image:
    the first block's input), else None (split before the stack: FLUX, FLUX.2)."""
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    for path, module in transformer.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None or not any(path == n or path.startswith(n + ".") for n in block_lists):
            continue
        for hook in registry.hooks.values():
            if isinstance(hook, ContextParallelSplitHook) and "hidden_states" in hook.metadata:
                return hook.metadata["hidden_states"]
    return None


def lockstep_for(transformer: torch.nn.Module, block_lists: Sequence[str]) -> Lockstep | None:
    """The :class:`Lockstep` of a context-parallel ``transformer`` (made once and kept on it), else None."""
    config = getattr(transformer, "_parallel_config", None)
    if config is None or getattr(config, "context_parallel_config", None) is None:
        return None
    lockstep = transformer.__dict__.get("_magcache_lockstep")
    if lockstep is None or lockstep.config is not config.context_parallel_config:
        lockstep = Lockstep(transformer, block_lists)
        transformer.__dict__["_magcache_lockstep"] = lockstep
    return lockstep


def run_in_lockstep(pipe: Any, lockstep: Lockstep, call: dict[str, Any],
                    on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
                    stop_requested: Callable[[], bool] | None = None,
                    call_with: Callable[..., Any] | None = None) -> Any:
    """``pipe(**call)`` on this rank of a context-parallel run, in step with the other ranks: they agree at every
    step end (so a stop on any rank stops all of them at the same step) and, when the run ends, wait for each other
    and learn whether any rank failed (:class:`PeerFailed` then, on the ranks that did not fail themselves).
    ``on_step_end`` is the caller's own ``callback_on_step_end``; setting ``pipe._interrupt`` in it stops every rank.
    ``call_with`` calls the pipeline instead of ``pipe`` itself (a subclass calling its base class's ``__call__``)."""

    def step_end(p: Any, i: int, t: Any, kwargs: dict) -> dict:
        out = on_step_end(p, i, t, kwargs) if on_step_end is not None else {}
        lockstep.agree_on_step_end(i)
        return out or {}

    lockstep.stop_requested = lambda: bool(getattr(pipe, "_interrupt", False)) or bool(
        stop_requested is not None and stop_requested())
    failed = True
    try:
        try:
            output = (call_with or pipe)(**call, callback_on_step_end=step_end)
        except RunStopped:
            failed = False
            raise
        failed = False
    finally:
        lockstep.stop_requested = lambda: False
        any_failed = lockstep.finish(failed)
    if any_failed:
        raise PeerFailed(f"rank {lockstep.rank}: another rank of the context-parallel run failed")
    return output
