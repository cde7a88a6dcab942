"""One run of a tab's model on the device, whatever kind of run it is (a comparison, a calibration, a sweep).

:func:`device_job` does what every kind shares, so a kind is a small function of what it does with the model:

* the request is validated and the model planned once, before waiting for the device (a bad input never queues),
  and admitted (:mod:`.public`: in public mode the catalog's model only, the compute budget, the requests per
  client, the client's place held until the job ends);
* the device is held first come first served (:meth:`ModelManager.device_slot`) and the model kept loaded while
  the job runs (:meth:`ModelManager.use`); on a CPU the job runs on :func:`cpu_threads` threads;
* a stop request (the session's token, :func:`session_token`) interrupts the pipeline at its next step: the step
  callback of :meth:`DeviceJob.step_arguments` sets ``pipe._interrupt``, which every pipeline here honours (a
  pipeline that takes no step callback, HunyuanVideo-1.5's, runs to its end and the job stops after it);
* whatever ends the job (done, stopped, an exception at any step, out of memory), the pipeline is left as a fresh
  one (:func:`reset_pipeline`), and an out-of-memory error frees memory and says what to change.

A new kind of run::

    def my_run(manager, req, stop=None, on_progress=None):
        with device_job(manager, req, stop, on_progress) as job:
            output = job.pipe(**job.call, generator=job.generator(), **job.step_arguments("my run"))
            job.call_returned("my run")
            job.raise_if_stopped("my run")
        return output
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

import magcache

from . import public
from .catalog import Tab, Variant
from .defaults import framepack_sections, tab_defaults
from .manager import Cancelled, LoadedModel, LoadPlan, ModelManager, OutOfMemory, is_out_of_memory, out_of_memory_message
from .request import GenerationRequest, InvalidRequest, build_call_kwargs, read_prompt, validate

# (phase, done, total): "queue" (done = requests ahead), "load", then the phases each kind of run names
ProgressFn = Callable[[str, int, int], None]


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


@dataclass
class DeviceJob:
    """The model of one validated request, loaded and held on the device for the length of the job."""

    manager: ModelManager
    tab: Tab
    variant: Variant
    request: GenerationRequest  # validated: every field filled and checked
    plan: LoadPlan
    stop: threading.Event | None
    progress: ProgressFn
    loaded: LoadedModel | None = None
    call: dict[str, Any] = field(default_factory=dict)  # the pipeline's arguments (no generator, no callback)
    phase: str = "loading the model"  # what runs now, in words (for an out-of-memory message)
    steps_done: int = 0  # steps of the current pipeline call, counted by the step callback
    loaded_now: bool = False  # this job loaded the model (its load time is the job's)
    notes: list[str] = field(default_factory=list)  # what the user should know about how the request was run

    @property
    def pipe(self) -> Any:
        return self.loaded.pipe

    @property
    def sections(self) -> int:
        """Scheduler passes per pipeline call: FramePack makes one per section, the others one."""
        if self.tab.task != "framepack":
            return 1
        return framepack_sections(self.call["num_frames"], self.call.get("latent_window_size", 9))

    @property
    def total_steps(self) -> int:
        """Steps of one pipeline call, all sections together (what the step callback counts)."""
        return self.call["num_inference_steps"] * self.sections

    def generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with the request's seed: every run of the job starts from the same noise."""
        return torch.Generator("cpu").manual_seed(int(self.request.seed))

    @property
    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    @property
    def takes_step_callback(self) -> bool:
        """Whether the pipeline takes a ``callback_on_step_end`` (HunyuanVideo-1.5's pipelines do not; a call that
        passes on keyword arguments, as the context-parallel leader's, is taken to)."""
        parameters = inspect.signature(type(self.pipe).__call__).parameters
        return "callback_on_step_end" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())

    def step_arguments(self, phase: str | None) -> dict[str, Any]:
        """The pipeline call's ``callback_on_step_end``, as keyword arguments: it counts steps
        (:attr:`steps_done`), reports ``(phase, done, total_steps)`` (``phase`` None: reports nothing, for runs that
        report per call) and interrupts the pipeline at the step where a stop was asked for. Nothing for a pipeline
        that takes no step callback (:meth:`call_returned` then reports its steps when the call ends)."""
        total = self.total_steps
        self.steps_done = 0
        if not self.takes_step_callback:
            return {}

        def on_step_end(p: Any, i: int, t: Any, kwargs: dict) -> dict:
            self.steps_done += 1
            if phase is not None:
                self.progress(phase, min(self.steps_done, total), total)
            if self.stopped:
                p._interrupt = True  # the pipeline skips its remaining steps
            return {}

        return {"callback_on_step_end": on_step_end}

    def call_returned(self, phase: str | None) -> None:
        """After a pipeline call that took no step callback: all its steps ran; count and report them."""
        if self.takes_step_callback:
            return
        self.steps_done = self.total_steps
        if phase is not None:
            self.progress(phase, self.steps_done, self.total_steps)

    def raise_if_stopped(self, what: str, started: bool = True) -> None:
        """:class:`Cancelled` when a stop was asked for, saying where: before ``what`` started, or the step of
        ``what`` it stopped after."""
        if not self.stopped:
            return
        if not started:
            raise Cancelled(f"stopped before the {what}")
        raise Cancelled(f"stopped during the {what} after step {self.steps_done} of {self.total_steps}")

    def eager_unless_compiled(self, compiled_run: bool = False):
        """Runs the blocks eagerly on a model compiled by an earlier run (no recompiles for new shapes), unless
        this run is meant to use the compiled blocks."""
        if compiled_run or not self.loaded.compiled:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("force_eager")


def synchronize(device: str | None = None) -> None:
    """Wait for the GPU's queued work (CUDA; ``device`` None: whichever is in use), so a timer around a pipeline
    call measures the call."""
    if torch.cuda.is_available() and (device is None or device.startswith("cuda")):
        torch.cuda.synchronize()


def cpu_threads() -> int:
    """Intra-op threads of a run on the CPU: ``MAGCACHE_CPU_THREADS``, else every core but one. A thread that
    waits for a core another process holds stalls the whole step (each op waits for its slowest thread): on a
    2-core machine with one core busy, two threads made the demo model's runs several times slower and their
    timings meaningless (nothing skipped read 0.68x and 7.58x), one thread ran at full speed. The core left over also serves the web server."""
    configured = os.environ.get("MAGCACHE_CPU_THREADS", "").strip()
    if configured:
        return max(1, int(configured))
    return max(1, (os.cpu_count() or 1) - 1)


@contextlib.contextmanager
def _threads_for(device: str) -> Iterator[None]:
    """:func:`cpu_threads` for the length of a job on the CPU (jobs hold the device one at a time)."""
    if not device.startswith("cpu"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reset_pipeline(pipe: Any) -> None:
    """Leave ``pipe`` as a fresh one after a run that ended in any way: no MagCache handle (which also drops its
    cached residuals), no pending interrupt, offload hooks and stateful diffusers hooks reset."""
    magcache.remove(pipe)
    if getattr(pipe, "_interrupt", False):
        pipe._interrupt = False
    with contextlib.suppress(Exception):  # a no-op without offload; must never mask the run's own error
        pipe.maybe_free_model_hooks()


@contextlib.contextmanager
def device_job(manager: ModelManager, req: GenerationRequest, stop: threading.Event | None = None,
               on_progress: ProgressFn | None = None, *, client: str | None = None,
               runs: int | None = None) -> Iterator[DeviceJob]:
    """Validate and admit ``req``, wait for the device, load (or reuse) the model and yield the job; the pipeline
    is reset however the block ends. ``client`` (who sent the request) and ``runs`` (full denoising runs the job
    makes; None: 2 with the baseline comparison, else 1) are what :func:`.public.admission` counts. Raises
    ``InvalidRequest`` / ``WeightsNotFound`` before queueing, ``WeightsNotFound`` / ``ModelLoadError`` from the
    load, :class:`OutOfMemory` with what to change."""
    progress = on_progress or _no_progress
    public.check_source(req.weights, req.base)  # before the plan: a visitor's path is never even looked at
    try:
        tab = manager.catalog.tab(req.tab_id)
        variant = tab.variant(req.variant)
    except KeyError as e:
        raise InvalidRequest(str(e).strip("'\"")) from None
    plan = manager.plan(tab.id, variant.id, req.weights, req.base)
    defaults = tab_defaults(manager, tab.id, variant.id, plan=plan)
    request, prompt_note = read_prompt(variant, validate(tab, req, defaults), defaults.get("prompt_words"))
    job = DeviceJob(manager, tab, variant, request, plan, stop, progress, notes=[prompt_note] if prompt_note else [])
    with public.admission(tab, request, defaults, manager.device, client, runs), \
            manager.device_slot(stop, on_wait=lambda ahead: progress("queue", ahead, ahead), who=tab.label), \
            _threads_for(manager.device):
        job.loaded_now = plan.key not in {m.key for m in manager.loaded()}
        with manager.use(tab.id, variant.id, plan=plan, on_status=lambda msg: progress("load", 0, 1)) as loaded:
            job.loaded = loaded
            out_of_memory = None
            try:
                job.call = build_call_kwargs(tab, variant, loaded, job.request)
                magcache.remove(loaded.pipe)  # never run through a leftover handle
                yield job
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                out_of_memory = f"{type(e).__name__}: {e}"
            finally:
                reset_pipeline(loaded.pipe)
            if out_of_memory is not None:  # out of the except block: the tensors its traceback held are free now
                manager.release_memory(keep=loaded.key)
                raise OutOfMemory(out_of_memory_message(tab, job.phase, out_of_memory, manager.device))


@contextlib.contextmanager
def session_token(manager: ModelManager, session: str) -> Iterator[threading.Event]:
    """The stop token of ``session``'s next job (``manager.cancel(session)`` sets it), released afterwards."""
    token = manager.cancel_token(session)
    try:
        yield token
    finally:
        manager.release_token(session, token)
