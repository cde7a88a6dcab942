"""Apply MagCache to a diffusers pipeline or transformer.

Per call of the transformer:

1. ``_begin_call`` finds the step (from the pipeline's scheduler, or a call counter) and the branch (the
   ``cache_context`` name if the pipeline sets one, else the call's position within the step: cond, then uncond),
   and asks that branch's ``BranchPolicy`` (``magcache.policy``) whether to skip.
2. The transformer's own ``forward`` runs. On a skipped step the adapter's block lists are swapped for empty
   ``ModuleList``s for the duration of the call, so only embeddings, ``input + cached residual`` (added by a
   pre-hook on the exit module) and the output head run. On a computed step the exit pre-hook stores
   ``residual = stack output - stack input``.

Nothing wraps or hooks the blocks themselves, so compiled blocks (``torch.compile`` / ``compile_repeated_blocks``)
stay compiled and see no guard changes. All state lives on the handle (per instance), per run and per branch; a new
run starts whenever the scheduler's timesteps are set again (every pipeline call, every FramePack section), and an
exception inside the transformer drops the run, so the next call starts fresh.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Sequence

import torch

from . import policy as P
from .adapters import Adapter, adapter_by_family, adapter_for
from .presets import Preset, get_preset

logger = logging.getLogger("magcache")

_EMPTY = torch.nn.ModuleList()


# --------------------------------------------------------------------------------------------------
# Stats
# --------------------------------------------------------------------------------------------------
@dataclass
class BranchStats:
    decisions: list[P.Decision] = field(default_factory=list)
    # calibration (filled only in calibration mode): per step, index 0 is the 1.0 padding
    mag_ratios: list[float] = field(default_factory=list)
    mag_std: list[float] = field(default_factory=list)
    cos_dis: list[float] = field(default_factory=list)

    @property
    def computed(self) -> list[int]:
        return P.computed_steps(self.decisions)

    @property
    def skipped(self) -> list[int]:
        return P.skipped_steps(self.decisions)

    @property
    def acc_err(self) -> list[float]:
        return [d.acc_err for d in self.decisions]


@dataclass
class RunStats:
    """What one run (one scheduler pass; one FramePack section) did."""

    num_steps: int
    settings: P.Settings
    calibrating: bool
    branches: dict[str, BranchStats] = field(default_factory=dict)
    completed: bool = False

    @property
    def computed(self) -> dict[str, list[int]]:
        return {b: s.computed for b, s in self.branches.items()}

    @property
    def skipped(self) -> dict[str, list[int]]:
        return {b: s.skipped for b, s in self.branches.items()}

    def summary(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "completed": self.completed,
            "computed": self.computed,
            "computed_per_branch": {b: len(v) for b, v in self.computed.items()},
            "skipped_per_branch": {b: len(v) for b, v in self.skipped.items()},
        }


# --------------------------------------------------------------------------------------------------
# Per-run state
# --------------------------------------------------------------------------------------------------
@dataclass
class _Branch:
    policy: P.BranchPolicy
    stats: BranchStats
    residual: torch.Tensor | None = None


@dataclass
class _Run:
    token: Any  # identifies the run: the scheduler's timesteps tensor (a new object per set_timesteps)
    num_steps: int
    settings: P.Settings
    curves: list[list[float]]
    calibrating: bool
    stats: RunStats
    forced: Mapping[str, frozenset] | None = None
    branches: dict[str, _Branch] = field(default_factory=dict)
    num_branches: int = 1  # grows as branches appear; known for sure from step 1 on
    last_step: int = -1
    ordinal: int = 0
    finished: set = field(default_factory=set)


@dataclass
class _Call:
    branch: _Branch
    step: int
    skip: bool
    keep_residual: bool  # False when caching is off for the run: no residual is ever reused
    entry: torch.Tensor | None = None
    folded: bool = False  # the residual buffer holds -entry (see _on_entry); entry itself is not kept


class _Clock:
    """Where the transformer is: ``(run token, step, num_steps)``."""

    def locate(self) -> tuple[Any, int, int]:
        raise NotImplementedError


class _SchedulerClock(_Clock):
    """Reads the pipeline's scheduler: ``set_timesteps`` creates a new ``timesteps`` tensor every run (and every
    FramePack section), ``step_index`` is the step about to be taken (``None`` before the first ``step()``), and
    ``begin_index`` is where img2img-style pipelines start."""

    def __init__(self, pipe: Any):
        self._pipe = weakref.ref(pipe)

    def locate(self) -> tuple[Any, int, int]:
        pipe = self._pipe()
        sched = getattr(pipe, "scheduler", None)
        timesteps = getattr(sched, "timesteps", None)
        if timesteps is None:
            raise RuntimeError("MagCache: the pipeline's scheduler has no timesteps; was set_timesteps called?")
        begin = getattr(sched, "begin_index", None) or 0
        index = getattr(sched, "step_index", None)
        step = (begin if index is None else index) - begin
        return timesteps, step, len(timesteps) - begin


class _CounterClock(_Clock):
    """For a bare transformer in a loop of ``num_steps`` steps with ``num_branches`` calls per step."""

    def __init__(self, num_steps: int, num_branches: int):
        if num_steps < 1 or num_branches < 1:
            raise ValueError("num_inference_steps and num_branches must be >= 1")
        self.num_steps, self.num_branches = num_steps, num_branches
        self.calls = 0
        self.token = object()

    def restart(self) -> None:
        self.calls, self.token = 0, object()

    def locate(self) -> tuple[Any, int, int]:
        if self.calls >= self.num_steps * self.num_branches:
            self.restart()
        step = self.calls // self.num_branches
        self.calls += 1
        return self.token, step, self.num_steps


# --------------------------------------------------------------------------------------------------
# The handle
# --------------------------------------------------------------------------------------------------
class MagCacheHandle:
    """Returned by :func:`apply`. Settings changed with :meth:`configure` take effect at the next run."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        adapter: Adapter,
        preset: Preset,
        settings: P.Settings,
        curves: Sequence[Sequence[float]],
        rules: P.Rules,
        clock: _Clock,
        calibrate: bool = False,
        keep_runs: int = 64,
    ):
        self.transformer = transformer
        self.adapter = adapter
        self.preset = preset
        self.settings = settings
        self.curves = [list(map(float, c)) for c in curves]
        self.rules = rules
        self.calibrate = calibrate
        # Optional fixed schedule {branch: steps to compute}, bypassing the policy: for naive baselines
        # (uniform / random skipping at the same computed-step count) and benchmarks.
        self.computed_steps: Mapping[str, Sequence[int]] | None = None
        self.enabled = True
        self.keep_runs = keep_runs
        self.runs: list[RunStats] = []
        self._calibration_start = 0  # index in ``runs`` where the current calibration began
        self._clock = clock
        self._run: _Run | None = None
        self._call: _Call | None = None
        self._hooks: list[Any] = []
        self._saved: dict[tuple[Any, str], tuple[Any, Any]] = {}  # (owner ref, attribute) -> (previous, ours)
        self._context_name: str | None = None
        self._attached = False
        self._lockstep = None  # the context-parallel ranks of the current run (magcache.parallel), or None

    # ---- public API ------------------------------------------------------------------------------
    def configure(
        self,
        thresh: float | None = None,
        retention_ratio: float | None = None,
        K: int | None = None,
        curves: Sequence[Sequence[float]] | None = None,
        calibrate: bool | None = None,
        enabled: bool | None = None,
        computed_steps: Mapping[str, Sequence[int]] | None | bool = False,
        **options: Any,
    ) -> "MagCacheHandle":
        """Change settings for the next run. ``options`` are :class:`magcache.policy.Settings` fields.
        ``computed_steps={"cond": [...], "uncond": [...]}`` forces a fixed schedule (``None`` returns to the
        policy); a branch missing from it uses the ``"cond"`` entry."""
        if computed_steps is not False:
            self.computed_steps = None if computed_steps is None else {b: sorted(set(v)) for b, v in computed_steps.items()}
        changes = {k: v for k, v in dict(thresh=thresh, retention_ratio=retention_ratio, K=K, **options).items() if v is not None}
        if changes:
            self.settings = replace(self.settings, **changes)
        if curves is not None:
            self.curves = _validated_curves(curves)
        if calibrate:
            self._calibration_start = len(self.runs)  # a new calibration: earlier runs are not averaged in
        if calibrate is not None:
            self.calibrate = calibrate
        if enabled is not None:
            self.enabled = enabled
        self.reset()
        return self

    def predict(self, num_steps: int, num_branches: int = 1) -> P.Schedule:
        """The schedule a run of ``num_steps`` will take with the current settings (no model is run). A fixed
        schedule (``configure(computed_steps=...)``) or calibration mode overrides the policy at run time and is
        not reflected here."""
        return P.simulate(self.curves, num_steps, self.settings, self.rules, num_branches)

    @property
    def last_run(self) -> RunStats | None:
        return self.runs[-1] if self.runs else None

    def reset(self) -> None:
        """Drop the current run's state (cached residuals included). Stats of finished runs are kept."""
        self._run = None
        self._call = None
        if isinstance(self._clock, _CounterClock):
            self._clock.restart()

    def reset_stats(self) -> None:
        self.runs.clear()
        self._calibration_start = 0

    def calibration(self) -> dict:
        """Per-branch calibration curves of the calibration runs recorded since calibration was last switched on
        (``apply(calibrate=True)`` or ``configure(calibrate=True)``), averaged over runs of the same length
        (FramePack records one run per section): ``{"num_steps", "runs", "branches": {name: {mag_ratios, mag_std,
        cos_dis}}}``, each curve of length ``num_steps`` starting with the 1.0 padding."""
        runs = [r for r in self.runs[self._calibration_start:] if r.calibrating and r.completed]
        if not runs:
            raise RuntimeError("no completed calibration run recorded; apply with calibrate=True and run the pipeline")
        from .calibration import average_runs

        n = runs[-1].num_steps
        runs = [r for r in runs if r.num_steps == n]
        return {"num_steps": n, "runs": len(runs), "branches": average_runs(runs)}

    def remove(self) -> None:
        """Detach from the transformer; it behaves exactly as before :func:`apply`."""
        if not self._attached:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        t = self.transformer
        for (owner_ref, name), (previous, ours) in self._saved.items():
            owner = owner_ref()
            if owner is None or owner.__dict__.get(name) is not ours:
                # Someone wrapped our wrapper later (e.g. accelerate's offload hooks replace ``forward``):
                # restoring would drop their wrapper, so ours stays in the chain as a pass-through.
                continue
            if previous is _MISSING:
                owner.__dict__.pop(name, None)
            else:
                owner.__dict__[name] = previous
        self._saved.clear()
        self.enabled = False
        if t.__dict__.get("_magcache_handle") is self:
            del t.__dict__["_magcache_handle"]
        self.reset()
        self._attached = False

    def __enter__(self) -> "MagCacheHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- attaching -------------------------------------------------------------------------------
    def _attach(self, pipe: Any = None) -> None:
        t, a = self.transformer, self.adapter
        for name in a.block_lists:
            if not isinstance(getattr(t, name, None), torch.nn.ModuleList):
                raise TypeError(f"{type(t).__name__} has no ModuleList {name!r}; adapter {a.family!r} does not fit it")
        entry, exit_ = t.get_submodule(a.entry_module), t.get_submodule(a.exit_module)
        self._hooks.append(entry.register_forward_hook(self._on_entry))
        self._hooks.append(exit_.register_forward_pre_hook(self._on_exit))
        original_forward = t.forward
        handle = self

        def forward(*args, **kwargs):
            if not (handle.enabled and handle._attached):
                return original_forward(*args, **kwargs)
            return handle._cached_forward(original_forward, args, kwargs)

        self._patch("forward", forward)
        original_context = getattr(t, "cache_context", None)
        if original_context is not None:

            @contextlib.contextmanager
            def cache_context(name: str, **kwargs):
                handle._context_name = name if handle._attached else None
                try:
                    with original_context(name, **kwargs):
                        yield
                finally:
                    handle._context_name = None

            self._patch("cache_context", cache_context)
        original_reset = getattr(t, "_reset_stateful_cache", None)
        if original_reset is not None:
            # pipelines call this at the end of __call__ (also when interrupted): free the cached residuals
            def _reset_stateful_cache(*args, **kwargs):
                if handle._attached:
                    handle._free_tensors()
                return original_reset(*args, **kwargs)

            self._patch("_reset_stateful_cache", _reset_stateful_cache)
        original_progress_bar = getattr(pipe, "progress_bar", None)
        if callable(original_progress_bar):
            # Every diffusers pipeline runs its denoising loop inside ``with self.progress_bar(...)``: leaving that
            # block (end, interrupt, an exception from a step callback, cancellation) frees the run's residuals.
            def progress_bar(*args, **kwargs):
                bar = original_progress_bar(*args, **kwargs)
                return _FreeOnExit(bar, handle) if handle._attached else bar

            self._patch("progress_bar", progress_bar, owner=pipe)
        t.__dict__["_magcache_handle"] = self
        self._attached = True

    def _patch(self, name: str, value: Any, owner: Any = None) -> None:
        owner = self.transformer if owner is None else owner
        self._saved[(weakref.ref(owner), name)] = (owner.__dict__.get(name, _MISSING), value)
        owner.__dict__[name] = value

    # ---- per call --------------------------------------------------------------------------------
    def _cached_forward(self, original_forward, args, kwargs):
        try:
            call = self._begin_call()
            if call.skip:
                with _blocks_left_out(self.transformer, self.adapter.block_lists):
                    out = original_forward(*args, **kwargs)
            else:
                out = original_forward(*args, **kwargs)
        except BaseException:
            self.reset()  # an exception or cancellation mid-run: the next call starts a fresh run
            raise
        self._end_call(call)
        return out

    def _begin_call(self) -> _Call:
        token, step, num_steps = self._clock.locate()
        run = self._run
        if run is None or run.token is not token or run.num_steps != num_steps or step < run.last_step:
            run = self._start_run(token, num_steps)
        if step == run.last_step:
            run.ordinal += 1
        else:
            run.last_step, run.ordinal = step, 0
            if step == 1:
                run.num_branches = max(run.num_branches, len(run.branches))
                for b in run.branches.values():
                    b.policy.set_num_branches(run.num_branches)
        name = self._context_name or P.branch_name(run.ordinal)
        branch = run.branches.get(name)
        if branch is None:
            index = P.BRANCH_NAMES.index(name) if name in P.BRANCH_NAMES else run.ordinal
            run.num_branches = max(run.num_branches, len(run.branches) + 1, index + 1)
            branch = self._new_branch(run, index)
            run.branches[name] = branch
            run.stats.branches[name] = branch.stats
        if run.calibrating:
            decision = P.Decision(step, False, 1.0, 0.0, "calibration")
        elif run.forced is not None:
            keep = run.forced.get(name, run.forced.get("cond", ()))
            skip = step not in keep and branch.residual is not None
            decision = P.Decision(step, skip, branch.policy.ratios[step], 0.0, "forced skip" if skip else "forced compute")
        else:
            decision = branch.policy.decide(step, branch.residual is not None)
        branch.stats.decisions.append(decision)
        if self._lockstep is not None:  # context parallel: every rank must take this same decision
            self._lockstep.agree_on_decision(num_steps, step, P.BRANCH_NAMES.index(name) if name in P.BRANCH_NAMES
                                             else run.ordinal, decision.skip)
        call = _Call(branch, step, decision.skip, run.calibrating or run.settings.enabled)
        self._call = call
        return call

    def _start_run(self, token: Any, num_steps: int) -> _Run:
        if self._run is not None:
            self._free_tensors()
        from .parallel import lockstep_for

        self._lockstep = lockstep_for(self.transformer, self.adapter.block_lists)
        stats = RunStats(num_steps, self.settings, self.calibrate)
        self.runs.append(stats)
        dropped = max(0, len(self.runs) - self.keep_runs)
        if dropped:
            del self.runs[:dropped]
            self._calibration_start = max(0, self._calibration_start - dropped)
        forced = None
        if self.computed_steps is not None:
            forced = {b: frozenset(v) for b, v in self.computed_steps.items()}
        self._run = _Run(token, num_steps, self.settings, self.curves, self.calibrate, stats, forced)
        return self._run

    def _new_branch(self, run: _Run, index: int) -> _Branch:
        prepared = P.prepare_curves(run.curves, run.num_steps, run.settings.sqrt_ratios, self.rules.step_mapping)
        pol = P.BranchPolicy(P.branch_curve(prepared, index), run.settings, self.rules, run.num_steps, index, run.num_branches)
        return _Branch(pol, BranchStats())

    def _end_call(self, call: _Call) -> None:
        self._call = None
        if call.folded:  # the exit module never ran: the buffer holds -entry, not a residual
            self.reset()
            raise RuntimeError(
                f"MagCache: {self.adapter.exit_module!r} did not run in {type(self.transformer).__name__}.forward; "
                f"the {self.adapter.family!r} adapter does not fit this model")
        run = self._run
        if run is None:
            return
        if call.step == run.num_steps - 1:
            call.branch.residual = None  # the branch's last step: nothing will reuse it
            run.finished.add(id(call.branch))
            if len(run.finished) == len(run.branches):
                run.stats.completed = True

    def _free_tensors(self) -> None:
        if self._run is not None:
            for b in self._run.branches.values():
                b.residual = None
        self._call = None

    # ---- hooks -----------------------------------------------------------------------------------
    def _on_entry(self, module, args, output):
        call = self._call
        if call is None or call.entry is not None or call.folded:
            return
        entry = self.adapter.stack_input(output)
        if self._lockstep is not None:
            entry = self._lockstep.shard_stack_input(entry)
        run, buf = self._run, call.branch.residual
        if call.skip or not call.keep_residual or entry.requires_grad or (run is not None and run.calibrating):
            call.entry = entry
            return
        # Computed step: the previous residual is dead, so its buffer takes -entry now and _on_exit adds the stack
        # output in place. Nothing else is held across the block stack: peak memory grows by one residual per
        # branch, not three (entry + previous residual + new residual). Same arithmetic: out + (-in) == out - in.
        if (buf is None or buf.shape != entry.shape or buf.dtype != entry.dtype or buf.device != entry.device
                or buf.is_inference() != torch.is_inference_mode_enabled()):
            call.branch.residual = buf = None  # free it before allocating the new one
            buf = torch.empty(entry.shape, dtype=entry.dtype, device=entry.device)
        torch.neg(entry, out=buf)
        call.branch.residual, call.folded = buf, True

    def _on_exit(self, module, args):
        call = self._call
        if call is None:
            return None
        if call.entry is None and not call.folded:
            raise RuntimeError(
                f"MagCache: {self.adapter.entry_module!r} did not run before {self.adapter.exit_module!r} in "
                f"{type(self.transformer).__name__}.forward; the {self.adapter.family!r} adapter does not fit this model"
            )
        hidden = args[0]
        entry, call.entry = call.entry, None
        branch = call.branch
        if call.folded:
            call.folded = False
            branch.residual.add_(hidden.to(branch.residual.dtype))  # -entry + out
            return None
        if call.skip:
            return (torch.add(entry, branch.residual).to(hidden.dtype), *args[1:])
        if not call.keep_residual:
            return None
        residual = hidden.to(entry.dtype) - entry
        if self._run is not None and self._run.calibrating:
            _record_calibration(branch, residual, self._lockstep)
        branch.residual = residual
        return None


_MISSING = object()


class _FreeOnExit:
    """The pipeline's progress bar, unchanged, except that leaving its ``with`` block frees cached residuals."""

    def __init__(self, bar: Any, handle: MagCacheHandle):
        self._bar, self._handle = bar, handle

    def __enter__(self) -> Any:
        return self._bar.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        self._handle._free_tensors()
        return self._bar.__exit__(*exc)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._bar)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


@contextlib.contextmanager
def _blocks_left_out(module: torch.nn.Module, names: Sequence[str]) -> Iterator[None]:
    saved = {n: module._modules[n] for n in names}
    try:
        for n in names:
            module._modules[n] = _EMPTY
        yield
    finally:
        module._modules.update(saved)


def _record_calibration(branch: _Branch, residual: torch.Tensor, lockstep: Any = None) -> None:
    s = branch.stats
    previous = branch.residual
    if previous is None or previous.shape != residual.shape:
        s.mag_ratios.append(1.0)
        s.mag_std.append(0.0)
        s.cos_dis.append(0.0)
        return
    cur, prev = residual.float(), previous.float()
    ratio = cur.norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(cur, prev, dim=-1, eps=1e-8)
    if lockstep is not None:  # context parallel: this rank holds a shard of the tokens; reduce over all ranks
        mean, std, distance = lockstep.token_statistics(ratio, 1 - cos)
    else:
        std = ratio.std().item() if ratio.numel() > 1 else 0.0
        mean, distance = ratio.mean().item(), (1 - cos).mean().item()
    s.mag_ratios.append(round(mean, 5))
    s.mag_std.append(round(std, 5))
    s.cos_dis.append(round(distance, 5))


def _validated_curves(curves: Sequence[Sequence[float]]) -> list[list[float]]:
    import math

    if isinstance(curves, Mapping) or not curves or isinstance(curves[0], (int, float)):
        raise ValueError("curves must be a list of per-branch ratio lists, e.g. [cond] or [cond, uncond]")
    out = []
    for c in curves:
        values = [float(v) for v in c]
        if len(values) < 2 or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError("each ratio curve needs at least 2 finite, positive values")
        out.append(values)
    if len(out) > 2:
        raise ValueError("at most two branch curves (cond, uncond) are supported")
    return out


# --------------------------------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------------------------------
def _split_target(target: Any) -> tuple[Any, torch.nn.Module]:
    if isinstance(target, torch.nn.Module):
        return None, target
    transformer = getattr(target, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"apply() needs a diffusers pipeline with a .transformer or a transformer module, got {type(target).__name__}")
    return target, transformer


def apply(
    target: Any,
    preset: str | None = None,
    thresh: float | None = None,
    retention_ratio: float | None = None,
    K: int | None = None,
    *,
    curves: Sequence[Sequence[float]] | None = None,
    calibrate: bool = False,
    num_inference_steps: int | None = None,
    num_branches: int = 1,
    rules: P.Rules | None = None,
    **options: Any,
) -> MagCacheHandle:
    """Enable MagCache on a diffusers pipeline (or a bare transformer) and return its handle.

    ``preset`` picks the ratio curve, reference defaults and reference rules (default: by model). Omitted
    ``thresh``/``retention_ratio``/``K`` take the preset's reference values. ``curves`` replaces the preset's curve
    (e.g. a calibration). ``calibrate=True`` computes every step and records ratio/std/cosine curves
    (:meth:`MagCacheHandle.calibration`). For a bare transformer, ``num_inference_steps`` (and ``num_branches``
    transformer calls per step) define a run. ``options`` are extra :class:`magcache.policy.Settings` fields such
    as ``protect_last_steps`` or ``sqrt_ratios``.
    """
    pipe, transformer = _split_target(target)
    existing = transformer.__dict__.get("_magcache_handle")
    if existing is not None:
        existing.remove()
    adapter = adapter_for(transformer)
    p = get_preset(preset or adapter.preset_for(pipe, transformer))
    if p.family is not None and adapter_by_family(p.family).transformer_classes != adapter.transformer_classes:
        raise ValueError(f"preset {p.id!r} is for {p.family} models, not {type(transformer).__name__}")
    settings = p.settings(thresh=thresh, retention_ratio=retention_ratio, K=K, **options)
    if pipe is not None:
        clock: _Clock = _SchedulerClock(pipe)
    elif num_inference_steps is not None:
        clock = _CounterClock(num_inference_steps, num_branches)
    else:
        raise ValueError("a bare transformer needs num_inference_steps (and num_branches for CFG); or pass the pipeline")
    handle = MagCacheHandle(
        transformer,
        adapter,
        p,
        settings,
        _validated_curves(curves) if curves is not None else [list(c) for c in p.curves],
        rules or p.rules,
        clock,
        calibrate=calibrate,
    )
    handle._attach(pipe)
    return handle


def remove(target: Any) -> None:
    """Remove MagCache from a pipeline or transformer (no-op if it is not applied)."""
    _, transformer = _split_target(target)
    handle = transformer.__dict__.get("_magcache_handle")
    if handle is not None:
        handle.remove()


def get_handle(target: Any) -> MagCacheHandle | None:
    _, transformer = _split_target(target)
    return transformer.__dict__.get("_magcache_handle")
