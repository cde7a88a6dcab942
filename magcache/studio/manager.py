"""The model manager: which pipeline a tab runs, loaded lazily, kept within a memory budget, one run per device.

* :meth:`ModelManager.plan` decides *what* to load (pure, no I/O beyond looking at paths): a tiny pipeline built in
  code (``MAGCACHE_TINY=1``, or the Demo tab before its model exists), a diffusers folder or hub id, a
  transformer folder/hub id on top of a base pipeline (FramePack), or a single-file transformer checkpoint
  (``<Transformer>.from_single_file(path, config=<base>, subfolder="transformer")``) on top of a base pipeline.
* :meth:`ModelManager.get` loads on first use, keeps models in LRU order and unloads the least recently used ones
  when the budget (``MAGCACHE_MEMORY_BUDGET_GB``, default: the device's memory) would be exceeded.
  :func:`plan_placement` picks float32 on CPU, bf16 on GPU, and model / sequential CPU offload plus VAE tiling
  when the GPU is short of memory.
* :meth:`ModelManager.device_slot` lets one generation at a time use the device, first come first served, and
  :meth:`ModelManager.cancel` stops a waiting or running generation of a session.
* Missing weights raise :class:`WeightsNotFound` with what to download and which variable or field to set; weights
  that exist but do not load (wrong architecture, broken file) raise :class:`ModelLoadError`; user weights load only
  from safetensors (never pickle).
* Out of memory (a CUDA OOM at load or in a run) frees what it can and raises :class:`OutOfMemory` with what to
  change; a model in use by a run is never unloaded under it (:meth:`ModelManager.use`).

No Gradio here: the UI, scripts and tests use the same object.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import importlib
import logging
import os
import re
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlparse

import torch

from .catalog import ROOT, Catalog, Tab, Variant, load_catalog, tiny_mode

logger = logging.getLogger("magcache.studio")

GB = 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".ckpt", ".pt", ".pth", ".bin", ".sft")
# Loading these runs Python's pickle, which can execute code: never for weights a user points at.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
OFFLOAD_MODES = ("model", "sequential")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class WeightsNotFound(RuntimeError):
    """The weights a tab needs are not on this machine (or the path is wrong); the message says what to do."""


class ModelLoadError(WeightsNotFound):
    """The weights exist but could not be loaded as this tab's model (wrong architecture, broken or unsafe file)."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory; what could be freed was freed and the message says what to change."""


class Cancelled(RuntimeError):
    """A generation was stopped by the user."""


_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")
_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_API_TOKEN")


def redact(text: str) -> str:
    """``text`` without access tokens (the values of HF_TOKEN and friends, and anything shaped like ``hf_…``), for
    every message the app shows or logs."""
    text = str(text)
    for name in _TOKEN_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 8:
            text = text.replace(value, "***")
    return _TOKEN_RE.sub("hf_***", text)


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA (or other accelerator) OOM, or the CPU allocator giving up."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def free_memory() -> None:
    """Return what the garbage collector and the CUDA caching allocator hold to the system."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def forced_offload() -> str | None:
    """``MAGCACHE_OFFLOAD=model`` / ``sequential``: CPU offload for every model loaded from now on (the lever an
    out-of-memory message points at)."""
    mode = (os.environ.get("MAGCACHE_OFFLOAD") or "").strip().lower()
    return mode if mode in OFFLOAD_MODES else None


# --------------------------------------------------------------------------------------------------
# What to load
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadPlan:
    key: str
    tab_id: str
    variant_id: str
    kind: str  # "tiny" | "pretrained" | "transformer+base" | "single_file"
    pipeline_cls: str
    transformer_cls: str
    preset: str  # the MagCache preset this model runs with
    pipeline_source: str | None = None  # hub id or local diffusers folder
    transformer_source: str | None = None  # transformer folder / hub id, or a single-file checkpoint
    components: Mapping[str, Any] = field(default_factory=dict)
    tiny_kind: str | None = None
    estimate_bytes: int = 0
    notes: tuple[str, ...] = ()

    @property
    def hub_ids(self) -> tuple[str, ...]:
        sources = [self.pipeline_source, self.transformer_source] + [c.source for c in self.components.values()]
        return tuple(dict.fromkeys(s for s in sources if s and not _is_local(s)))

    def describe(self) -> str:
        if self.kind == "tiny":
            return f"tiny random {self.tiny_kind} pipeline (built in code)"
        if self.kind == "single_file":
            return f"{self.transformer_source} (single file) + {self.pipeline_source}"
        if self.kind == "transformer+base":
            return f"{self.transformer_source} + {self.pipeline_source}"
        return str(self.pipeline_source)


def _is_local(source: str) -> bool:
    return Path(os.path.expanduser(source)).exists()


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or "\\" in source or not _HUB_ID.match(source)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def preset_or_fallback(preset: str, fallback: str | None) -> tuple[str, str | None]:
    """The preset to run with, and a note when the fallback had to be used."""
    from magcache.presets import list_presets

    if preset in list_presets() or fallback is None:
        return preset, None
    return fallback, f"MagCache preset {preset!r} is not shipped yet; using {fallback!r} instead."


# --------------------------------------------------------------------------------------------------
# Where to put it
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    device: str
    dtype: torch.dtype
    offload: str | None  # None | "model" | "sequential"
    vae_tiling: bool
    reason: str


def default_device() -> str:
    return os.environ.get("MAGCACHE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: str) -> torch.dtype:
    name = os.environ.get("MAGCACHE_DTYPE")
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def plan_placement(device: str, dtype: torch.dtype, component_bytes: Mapping[str, int], free_bytes: int | None,
                   video: bool = False, offload: str | None = None) -> Placement:
    """Fit a loaded pipeline (sizes measured per component) onto ``device`` with ``free_bytes`` available.

    Everything on the device when it fills at most 80% of the free memory (the rest is for activations); else
    model CPU offload (one component on the GPU at a time) when the largest component fits; else sequential
    offload (layer by layer, slow but fits anything). VAE tiling whenever memory is short, and for videos.
    ``offload`` (``MAGCACHE_OFFLOAD``) forces an offload mode on a GPU."""
    if not device.startswith("cuda") or free_bytes is None:
        return Placement(device, dtype, None, False, f"{device}: everything in memory")
    if offload in OFFLOAD_MODES:
        return Placement(device, dtype, offload, True, f"MAGCACHE_OFFLOAD={offload}: {offload} CPU offload, VAE tiling")
    total = sum(component_bytes.values())
    largest = max(component_bytes.values(), default=0)
    if total <= 0.8 * free_bytes:
        tiling = video and total > 0.5 * free_bytes
        return Placement(device, dtype, None, tiling, f"fits: {total / GB:.1f} of {free_bytes / GB:.1f} GiB free")
    if largest <= 0.8 * free_bytes:
        return Placement(device, dtype, "model", True,
                         f"{total / GB:.1f} GiB > {free_bytes / GB:.1f} GiB free: model CPU offload, VAE tiling")
    return Placement(device, dtype, "sequential", True,
                     f"largest component {largest / GB:.1f} GiB > free memory: sequential CPU offload, VAE tiling")


def module_bytes(module: torch.nn.Module) -> int:
    from ..speed import stored_bytes  # quantized weights hold less than their reported dtype says

    return sum(stored_bytes(t) for t in list(module.parameters()) + list(module.buffers()))


def pipeline_component_bytes(pipe: Any) -> dict[str, int]:
    comps = getattr(pipe, "components", {}) or {}
    return {name: module_bytes(c) for name, c in comps.items() if isinstance(c, torch.nn.Module)}


# --------------------------------------------------------------------------------------------------
# The device queue and cancellation
# --------------------------------------------------------------------------------------------------
class FairDeviceLock:
    """One holder at a time, served strictly in arrival order; waiting can be cancelled."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[object] = []
        self._busy = False
        self._holder: tuple[str, float] | None = None  # (who, monotonic time it took the device)

    @property
    def holder(self) -> tuple[str, float] | None:
        """Who holds the device and for how many seconds so far; None when it is free."""
        with self._cond:
            if self._holder is None:
                return None
            who, since = self._holder
            return who, time.monotonic() - since

    @contextlib.contextmanager
    def hold(self, cancel: threading.Event | None = None,
             on_wait: Callable[[int], None] | None = None, who: str = "") -> Iterator[None]:
        me = object()
        with self._cond:
            self._queue.append(me)
            try:
                while self._busy or self._queue[0] is not me:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("stopped while waiting for the device")
                    if on_wait is not None:
                        on_wait(self._queue.index(me) + int(self._busy))
                    self._cond.wait(0.2)
                self._queue.pop(0)
                self._busy = True
                self._holder = (who, time.monotonic())
            except BaseException:
                if me in self._queue:
                    self._queue.remove(me)
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._holder = None
                self._cond.notify_all()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._busy


# --------------------------------------------------------------------------------------------------
# Loaded models
# --------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    plan: LoadPlan
    pipe: Any
    bytes: int
    placement: Placement | None
    load_seconds: float
    compiled: bool = False
    warm: set = field(default_factory=set)  # call shapes already run once (warm-up done)
    users: int = 0  # runs using it now (ModelManager.use): never unloaded while > 0
    unload_when_free: bool = False  # an unload was asked for while it was in use

    @property
    def key(self) -> str:
        return self.plan.key

    @property
    def preset(self) -> str:
        return self.plan.preset


Loader = Callable[[LoadPlan], LoadedModel]


class ModelManager:
    def __init__(
        self,
        catalog: Catalog | None = None,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        budget_gb: float | None = None,
        tiny: bool | None = None,
        demo_dir: str | os.PathLike | None = None,
        loader: Loader | None = None,
    ):
        self.catalog = catalog or load_catalog()
        self.device = device or default_device()
        self.dtype = dtype or default_dtype(self.device)
        env_budget = os.environ.get("MAGCACHE_MEMORY_BUDGET_GB")
        budget = budget_gb if budget_gb is not None else (float(env_budget) if env_budget else None)
        self.budget_bytes = int(budget * GB) if budget is not None else _device_memory(self.device)
        self.tiny = tiny_mode() if tiny is None else tiny
        self.demo_dir = Path(demo_dir) if demo_dir is not None else None
        self._loader = loader or self._load
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.RLock()  # the model dict (short holds only)
        self._load_lock = threading.Lock()  # one load at a time (unload() needs only _lock: it never waits for a load)
        self._device_lock = FairDeviceLock()
        self._tokens: dict[str, threading.Event] = {}
        self._token_lock = threading.Lock()
        # load / unload log, newest last (shown in the app, checked by tests); bounded for long-running Spaces
        self.events: collections.deque[str] = collections.deque(maxlen=500)

    # ---- planning ------------------------------------------------------------------------------
    def plan(self, tab_id: str, variant: str | None = None, weights: str | None = None,
             base: str | None = None) -> LoadPlan:
        """Decide what ``tab_id``/``variant`` loads. ``weights``/``base`` override the catalog (UI fields);
        ``MAGCACHE_WEIGHTS_<VARIANT>`` / ``MAGCACHE_BASE_<VARIANT>`` override it from the environment."""
        tab = self.catalog.tab(tab_id)
        v = tab.variant(variant)
        preset, note = preset_or_fallback(v.magcache.preset, v.magcache.fallback_preset)
        notes = [note] if note else []
        common = dict(tab_id=tab.id, variant_id=v.id, pipeline_cls=tab.pipeline, transformer_cls=tab.transformer)
        typed = (weights or "").strip()
        weights = typed or v.weights_from_env() or v.weights
        base = (base or "").strip() or v.base_from_env() or v.base
        if typed:
            _check_single_file_suffix(Path(typed))  # pickle checkpoints are refused by name, existing or not

        if v.local_only:  # the Demo tab: its own model folder, or (not typed in the tab) a tiny stand-in
            folder = self.demo_dir if self.demo_dir is not None and weights == v.weights else _resolve(weights)
            if typed and _pipeline_class(folder) != tab.pipeline:  # never a silent stand-in for a typed path
                raise WeightsNotFound(f"{tab.label}: {typed!r} is not a demo model folder (a {tab.pipeline} in "
                                      "diffusers format, as `python -m magcache.studio.demo.train` writes) that "
                                      "this app can read (or it does not exist). Leave the Weights field empty to "
                                      f"run the demo model ({v.env_weights} or {v.weights}).")
            if (folder / "model_index.json").is_file():
                return LoadPlan(key=f"{v.id}|{folder}", kind="pretrained", preset=preset, pipeline_source=str(folder),
                                estimate_bytes=_folder_bytes(folder), notes=tuple(notes), **common)
            preset, _ = preset_or_fallback(v.magcache.fallback_preset or preset, None)
            notes = [f"The demo model is not at {_display_path(folder)}: running a tiny "
                     f"random FLUX pipeline built in code instead, with the {preset!r} MagCache preset. Its images "
                     "are noise; the timings, schedules and metrics are real."]
            return LoadPlan(key=f"{v.id}|tiny", kind="tiny", preset=preset, tiny_kind=tab.tiny,
                            estimate_bytes=GB // 1024, notes=tuple(notes), **common)

        if self.tiny:
            notes.append("MAGCACHE_TINY=1: tiny random-weight pipeline built in code (offline). Outputs are noise; "
                         "timings, schedules and metrics are real.")
            return LoadPlan(key=f"{v.id}|tiny", kind="tiny", preset=preset, tiny_kind=tab.tiny,
                            estimate_bytes=GB // 1024, notes=tuple(notes), **common)

        factor = 2 if self.dtype == torch.float32 else 1  # the catalog's sizes are bf16
        approx = int((v.approx_size_gb or 0) * GB * factor)
        default_base = v.base if v.weights_role == "transformer" else v.weights
        path = Path(os.path.expanduser(weights))
        what = "a diffusers pipeline folder, a transformer folder, or a single-file .safetensors checkpoint"
        if path.is_file() or (path.suffix.lower() == ".safetensors" and not path.is_dir()):
            _check_single_file_suffix(path)
            if path.suffix.lower() != ".safetensors":  # the same answer as for a path that does not exist
                raise WeightsNotFound(unloadable_path_message(tab, v, weights, what))
            _check_single_file_loadable(tab, v)
            _check_safetensors_header(path)
            base = base or default_base
            rest = approx - int((v.transformer_gb or 0) * GB * factor)
            return LoadPlan(key=f"{v.id}|{path}|{base}", kind="single_file", preset=preset, pipeline_source=base,
                            transformer_source=str(path), components=v.components,
                            estimate_bytes=path.stat().st_size * factor + max(rest, 0), notes=tuple(notes), **common)
        if path.is_dir():
            if v.weights_role == "pipeline" and (path / "model_index.json").is_file():
                return LoadPlan(key=f"{v.id}|{path}", kind="pretrained", preset=preset, pipeline_source=str(path),
                                components=v.components, estimate_bytes=_folder_bytes(path) * factor,
                                notes=tuple(notes), **common)
            if (path / "config.json").is_file():  # a transformer folder: the rest comes from the base pipeline
                base = base or default_base
                return LoadPlan(key=f"{v.id}|{path}|{base}", kind="transformer+base", preset=preset,
                                pipeline_source=base, transformer_source=str(path), components=v.components,
                                estimate_bytes=max(approx, _folder_bytes(path) * factor), notes=tuple(notes), **common)
            raise WeightsNotFound(unloadable_path_message(tab, v, weights, what))
        if _looks_like_path(weights):
            raise WeightsNotFound(unloadable_path_message(tab, v, weights, what))
        if v.weights_role == "transformer":
            return LoadPlan(key=f"{v.id}|{weights}|{base}", kind="transformer+base", preset=preset, pipeline_source=base,
                            transformer_source=weights, components=v.components, estimate_bytes=approx,
                            notes=tuple(notes), **common)
        return LoadPlan(key=f"{v.id}|{weights}", kind="pretrained", preset=preset, pipeline_source=weights,
                        components=v.components, estimate_bytes=approx, notes=tuple(notes), **common)

    # ---- loading / unloading -------------------------------------------------------------------
    def get(self, tab_id: str, variant: str | None = None, weights: str | None = None, base: str | None = None,
            on_status: Callable[[str], None] | None = None) -> LoadedModel:
        """The loaded model for this tab/variant/source: loaded now if needed, marked most recently used.
        Raises :class:`WeightsNotFound` / :class:`ModelLoadError` / :class:`OutOfMemory` with what to do."""
        return self._get(self.plan(tab_id, variant, weights, base), on_status, hold=False)

    @contextlib.contextmanager
    def use(self, tab_id: str, variant: str | None = None, weights: str | None = None, base: str | None = None,
            on_status: Callable[[str], None] | None = None, *, plan: LoadPlan | None = None) -> Iterator[LoadedModel]:
        """:meth:`get`, and keep the model loaded until the ``with`` block ends: a load for another request (an
        LRU eviction) or an unload request waits for the run instead of pulling the model out from under it.
        ``plan``: a plan the caller already made for this request (then the other arguments are not read)."""
        loaded = self._get(plan or self.plan(tab_id, variant, weights, base), on_status, hold=True)
        try:
            yield loaded
        finally:
            with self._lock:
                loaded.users -= 1
                unload = loaded.users == 0 and loaded.unload_when_free
            if unload:
                self.unload(loaded.key)
            self._make_room(0)  # evictions skipped while it was in use

    def _get(self, plan: LoadPlan, on_status: Callable[[str], None] | None, hold: bool) -> LoadedModel:
        with self._load_lock:  # one load at a time; the model dict itself stays readable meanwhile
            with self._lock:
                if plan.key in self._models:
                    self._models.move_to_end(plan.key)
                    loaded = self._models[plan.key]
                    loaded.users += int(hold)
                    loaded.unload_when_free = False
                    return loaded
            self._make_room(plan.estimate_bytes)
            if on_status:
                on_status(f"Loading {plan.describe()}…")
            loaded = self._load_freeing_memory(plan)
            with self._lock:
                loaded.users += int(hold)
                self._models[plan.key] = loaded
                self.events.append(redact(f"loaded {plan.key} ({loaded.bytes / GB:.2f} GiB, "
                                          f"{loaded.load_seconds:.1f} s)"))
                logger.info(self.events[-1])
            self._make_room(0, keep=plan.key)
            return loaded

    def _load_freeing_memory(self, plan: LoadPlan) -> LoadedModel:
        """Run the loader. Out of memory: free, unload the other models not in use and try once more, then raise
        :class:`OutOfMemory`. Any other failure of weights that exist becomes a :class:`ModelLoadError`."""
        for attempt in (1, 2):
            failure: str | None = None
            try:
                return self._loader(plan)
            except (WeightsNotFound, Cancelled):
                raise
            except Exception as e:  # noqa: BLE001 - third-party loaders raise anything; the message says what
                if not is_out_of_memory(e):
                    logger.warning("loading %s failed: %s", redact(plan.key), redact(f"{type(e).__name__}: {e}"))
                    raise ModelLoadError(load_failure_message(self.catalog.tab(plan.tab_id), plan, e)) from None
                failure = f"{type(e).__name__}: {e}"
            # Out of the except block: the traceback (and the half-loaded weights it references) is gone now.
            free_memory()
            with self._lock:
                others = [k for k, m in self._models.items() if m.users == 0]
                event = f"out of memory loading {plan.variant_id}; unloading {len(others)} other model(s)"
                self.events.append(event)
            logger.warning(event)  # not events[-1]: another thread may have appended since
            for key in others:
                self.unload(key)
            if attempt == 2 or not others:
                break
        raise OutOfMemory(out_of_memory_message(self.catalog.tab(plan.tab_id), "loading the model",
                                                redact(failure or ""), self.device))

    def release_memory(self, keep: str | None = None) -> None:
        """After an out-of-memory run: unload every model but ``keep`` that no run uses, and free caches."""
        with self._lock:
            others = [k for k, m in self._models.items() if k != keep and m.users == 0]
        for key in others:
            self.unload(key)
        free_memory()

    def _make_room(self, needed: int, keep: str | None = None) -> None:
        """Unload least recently used models until ``needed`` more bytes fit the budget (never ``keep``, never a
        model a run is using)."""
        while True:
            with self._lock:
                if not self._models or self.used_bytes() + needed <= self.budget_bytes:
                    return
                victim = next((k for k, m in self._models.items() if k != keep and m.users == 0), None)
            if victim is None:
                return  # only models in use (or the one just loaded) are left: they stay, offloaded if need be
            self.unload(victim)

    def unload(self, key: str) -> bool:
        """Unload ``key`` now; a model in use is unloaded when its run ends (returns False then)."""
        with self._lock:
            loaded = self._models.get(key)
            if loaded is None:
                return True
            if loaded.users > 0:
                loaded.unload_when_free = True
                return False
            del self._models[key]
            self.events.append(redact(f"unloaded {key}"))
            logger.info(self.events[-1])
        _release(loaded)
        del loaded
        free_memory()
        return True

    def unload_all(self) -> None:
        with self._lock:
            keys = list(self._models)
        for key in keys:
            self.unload(key)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(m.bytes for m in self._models.values())

    def loaded(self) -> list[LoadedModel]:
        """Loaded models, least recently used first."""
        with self._lock:
            return list(self._models.values())

    def _free_device_bytes(self) -> int | None:
        if self.device.startswith("cuda") and torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(torch.device(self.device))
            return int(free)
        return None

    def _load(self, plan: LoadPlan) -> LoadedModel:
        t0 = time.perf_counter()
        tab = self.catalog.tab(plan.tab_id)
        if plan.kind == "tiny":
            from .tiny import build_tiny_pipeline

            pipe = build_tiny_pipeline(plan.tiny_kind)
            placement = Placement(self.device, torch.float32, None, False, "tiny pipeline: float32")
            pipe.to(self.device)
        else:
            _check_available(tab, tab.variant(plan.variant_id), plan)
            pipe = self._from_pretrained(plan)
            placement = plan_placement(self.device, self.dtype, pipeline_component_bytes(pipe),
                                       self._free_device_bytes(), tab.is_video, forced_offload())
            _place(pipe, placement)
        pipe.set_progress_bar_config(disable=True)
        size = sum(pipeline_component_bytes(pipe).values())
        return LoadedModel(plan, pipe, size, placement, time.perf_counter() - t0)

    def _from_pretrained(self, plan: LoadPlan) -> Any:
        import diffusers

        dtype = self.dtype
        local = plan.pipeline_source is not None and _is_local(plan.pipeline_source)
        extra: dict[str, Any] = {}
        if plan.transformer_source:
            tcls = getattr(diffusers, plan.transformer_cls)
            if plan.kind == "single_file":  # a .safetensors file (plan() refuses anything else)
                extra["transformer"] = tcls.from_single_file(
                    plan.transformer_source, config=plan.pipeline_source, subfolder="transformer",
                    dtype=dtype, local_files_only=local)
            else:
                extra["transformer"] = tcls.from_pretrained(
                    plan.transformer_source, dtype=dtype, local_files_only=_is_local(plan.transformer_source),
                    use_safetensors=True)
        for name, comp in plan.components.items():
            cls = _import_class(comp.cls)
            kwargs: dict[str, Any] = {"subfolder": comp.subfolder} if comp.subfolder else {}
            if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
                kwargs.update(dtype=dtype, use_safetensors=True)
            extra[name] = cls.from_pretrained(comp.source, local_files_only=_is_local(comp.source), **kwargs)
        pipe_cls = getattr(diffusers, plan.pipeline_cls)
        # use_safetensors=True: every model weight comes from .safetensors files, never from pickle (.bin/.pt).
        return pipe_cls.from_pretrained(plan.pipeline_source, dtype=dtype, local_files_only=local,
                                        use_safetensors=True, **extra)

    # ---- one generation per device; cancellation -----------------------------------------------
    def device_slot(self, cancel: threading.Event | None = None, on_wait: Callable[[int], None] | None = None,
                    who: str = ""):
        """Context manager: hold the device for one generation (FIFO across all tabs and sessions); ``who`` (a
        tab's name) is what :meth:`device_holder` tells the requests waiting behind it."""
        return self._device_lock.hold(cancel, on_wait, who)

    def device_holder(self) -> tuple[str, float] | None:
        """(who, seconds held) of the run on the device; None when it is free."""
        return self._device_lock.holder

    @property
    def device_busy(self) -> bool:
        """A generation holds the device now."""
        return self._device_lock.busy

    def cancel_token(self, session: str) -> threading.Event:
        """A fresh stop flag for ``session``'s next generation (replacing any earlier one)."""
        token = threading.Event()
        with self._token_lock:
            self._tokens[session] = token
        return token

    def cancel(self, session: str) -> bool:
        """Stop ``session``'s waiting or running generation; False when it has none."""
        with self._token_lock:
            token = self._tokens.get(session)
        if token is None or token.is_set():
            return False
        token.set()
        return True

    def release_token(self, session: str, token: threading.Event) -> None:
        with self._token_lock:
            if self._tokens.get(session) is token:
                del self._tokens[session]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _resolve(path: str) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else ROOT / p


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def _device_memory(device: str) -> int:
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory * 0.95)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 * GB
    return int(ram * 0.7)


def _import_class(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module or "diffusers"), name)


def _place(pipe: Any, placement: Placement) -> None:
    if placement.offload == "model":
        pipe.enable_model_cpu_offload(device=placement.device)
    elif placement.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=placement.device)
    else:
        pipe.to(placement.device)
    vae = getattr(pipe, "vae", None)
    if placement.vae_tiling and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()


def _release(loaded: LoadedModel) -> None:
    pipe = loaded.pipe
    with contextlib.suppress(Exception):
        import magcache

        magcache.remove(pipe)
    with contextlib.suppress(Exception):
        pipe.remove_all_hooks()
    loaded.pipe = None


def unloadable_path_message(tab: Tab, v: Variant, typed: str, what: str) -> str:
    """One answer for every path that cannot be loaded (missing, unreadable, a folder of something else, a file
    of another kind): the message tells nothing about the server's files beyond the path that was typed."""
    return (f"{tab.label} ({v.label}): {typed!r} is not {what} that this app can read (or it does not exist). Set "
            f"{v.env_weights} / the Weights field to one, or to a hub id such as {v.weights!r}; "
            f"`hf download {v.weights} --local-dir <folder>` creates such a folder.")


def _pipeline_class(folder: Path) -> str | None:
    """The pipeline class a diffusers folder declares (``model_index.json``), None for anything else."""
    import json

    try:
        return json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _check_single_file_suffix(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise WeightsNotFound(
            f"{path.name}: {suffix} checkpoints are pickle files, which can run code when loaded, so the app never "
            "loads them. Use a .safetensors checkpoint, or convert this one on a trusted machine "
            "(`safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')`).")


def _check_safetensors_header(path: Path) -> None:
    """Read only the header: a truncated or mislabelled file fails here with a clear message, before any load."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise ValueError("it holds no tensors")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for every kind of bad file
        # The reason goes to the log only: the message must not tell a file that exists from one that does not.
        logger.info("%s: not a readable safetensors file: %s", redact(str(path)), redact(f"{type(e).__name__}: {e}"))
        raise WeightsNotFound(f"{path.name} is not a valid .safetensors checkpoint (or it cannot be read). Download "
                              "it again, or point the Weights field at a diffusers folder.") from None


def load_failure_message(tab: Tab, plan: LoadPlan, error: BaseException) -> str:
    """What to tell the user when weights that exist do not load as this tab's model."""
    reason = redact(f"{type(error).__name__}: {error}".strip())[:400]
    if plan.kind == "single_file":
        return (f"{tab.label}: {Path(plan.transformer_source or '').name} could not be loaded as a {tab.transformer} "
                f"checkpoint, so it is probably for another model architecture (or incomplete). Use a {tab.label} "
                f"transformer checkpoint (.safetensors) here, with the Base pipeline field naming a {tab.label} "
                f"diffusers folder. Loader error: {reason}")
    return (f"{tab.label}: {plan.describe()} could not be loaded as a {tab.pipeline}. Check that the Weights field "
            f"(or {tab.variant(plan.variant_id).env_weights}) points at a {tab.label} model in diffusers format with "
            f".safetensors weights (pickle .bin weights are never loaded). Loader error: {reason}")


def out_of_memory_message(tab: Tab, during: str, error: str, device: str) -> str:
    """What to change after an out-of-memory error, for this tab's inputs."""
    video = "frames" in tab.inputs
    smaller = "a lower resolution" + (" or fewer frames" if video else "") if "size" in tab.inputs or video else None
    tips = [f"use {smaller}" if smaller else "use a smaller input image",
            "turn off Compare with baseline (one run instead of two)"]
    if device.startswith("cuda"):
        tips.append("turn on CPU offload: start the app with MAGCACHE_OFFLOAD=model (or sequential, slowest, least "
                    "memory), then press Unload all models")
    tips.append("close other programs using the GPU")
    return (f"Out of memory while {during} ({error.strip()[:200] or 'out of memory'}). Memory was freed and the app "
            "keeps running. To fit, " + "; ".join(tips) + ".")


def _single_file_loadable(transformer_cls: str) -> bool:
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    return transformer_cls in SINGLE_FILE_LOADABLE_CLASSES


def _check_single_file_loadable(tab: Tab, v: Variant) -> None:
    if not _single_file_loadable(tab.transformer):
        raise WeightsNotFound(
            f"{tab.label}: {tab.transformer} checkpoints cannot be loaded from a single file with diffusers "
            f"(no from_single_file support). Download the diffusers-format transformer instead "
            f"(`hf download {v.weights} --local-dir <folder>`) and set {v.env_weights} / the Weights field to that folder.")


_hub_reachable: tuple[float, bool] | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can this machine reach the Hugging Face Hub? (False when HF_HUB_OFFLINE is set; cached for a minute.)"""
    global _hub_reachable
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    now = time.monotonic()
    if _hub_reachable is not None and now - _hub_reachable[0] < 60:
        return _hub_reachable[1]
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            ok = True
    except OSError:
        ok = False
    _hub_reachable = (now, ok)
    return ok


def _cached(repo_id: str) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, local_files_only=True)
        return True
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return False


def _check_available(tab: Tab, v: Variant, plan: LoadPlan) -> None:
    """Fail fast, with instructions, when hub weights are neither cached nor downloadable."""
    for source in (plan.pipeline_source, plan.transformer_source):
        if source and _looks_like_path(source) and not _is_local(source):
            raise WeightsNotFound(f"{tab.label} ({v.label}): {source!r} is not a local diffusers folder this app "
                                  f"can read (or it does not exist). Set {v.env_base} / the Base pipeline field to a "
                                  "local diffusers folder or a hub id.")
    missing = [r for r in plan.hub_ids if not _cached(r)]
    if not missing or hub_reachable():
        return
    raise WeightsNotFound(missing_weights_message(tab, v, missing))


def missing_weights_message(tab: Tab, v: Variant, missing: list[str]) -> str:
    from huggingface_hub import constants

    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub cannot be reached"
    lines = [f"{tab.label} ({v.label}) needs weights that are not on this machine: "
             f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not in the Hugging Face cache "
             f"({constants.HF_HUB_CACHE}) and {offline}.",
             "Fix it in one of these ways:",
             "• On a machine with Hub access run "
             + " and ".join(f"`hf download {r}`" for r in missing)
             + (" (gated model: accept its license on the model page and run `hf auth login` first)" if v.gated else "")
             + ", then copy the Hugging Face cache here (or point HF_HOME at it)."]
    for repo in missing:
        folder = f"/models/{repo.split('/')[-1]}"
        if repo in (v.weights, v.base):
            env, fld = (v.env_weights, "Weights") if repo == v.weights else (v.env_base, "Base pipeline")
            lines.append(f"• Or `hf download {repo} --local-dir {folder}` and set {env}={folder} (or the {fld} "
                         "field in the tab's Model source section).")
    if _single_file_loadable(tab.transformer):
        lines.append(f"   A single-file transformer checkpoint (.safetensors) also works in the Weights field "
                     f"({v.env_weights}), with the Base pipeline field ({v.env_base}) naming a local diffusers "
                     "folder for the other components.")
    lines.append("• Or try every tab offline with tiny random pipelines: MAGCACHE_TINY=1 python app.py")
    return "\n".join(lines)
