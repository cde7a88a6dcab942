"""What a request must pass before it may wait for the device: strict parsing of every field an API client can
send, public mode (a server open to strangers: no server paths, only the catalog's models, calibrations kept per
visitor), a compute budget per request and a limit of requests per client.

Public mode is ``MAGCACHE_PUBLIC=1``, on by default where ``SPACE_ID`` is set (as on Hugging Face Spaces);
``MAGCACHE_PUBLIC=0`` turns it off there. The limits and their variables are in docs/reliability.md.

No Gradio here: the UI registers how to read the running event's session (:func:`read_sessions_with`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from magcache.calibration import default_store_dir

from .catalog import Tab
from .request import MAX_PROMPT_CHARS, InvalidRequest

MAX_PATH_CHARS = 1024  # longer than any real model path; beyond it the OS answers "File name too long"
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")
TEXT_FIELDS = {"prompt": "Prompt", "negative_prompt": "Negative prompt", "variant": "Model variant",
               "curve": "Ratio curve"}
PATH_FIELDS = {"weights": "Weights", "base": "Base pipeline"}
FLAG_FIELDS = {"compare": "Compare with baseline", "compile": "Compile blocks"}

# Work = output pixels x frames x steps x runs (baseline + MagCache) x transformer passes per step (2 with real
# CFG). Defaults: on a CPU, the Demo tab at its defaults (128x128, 28 steps, CFG, baseline) is 1.8 M; a
# 1024x1024 2-step Demo run (8.4 M) took 15.7 s on a 2-core machine: 2^24 is about half a minute there.
# On a GPU, Wan 2.1 1.3B at its defaults (832x480, 81 frames, 50 steps, CFG, baseline) is 6.5 G: it fits;
# HunyuanVideo 720p with the baseline (11.9 G) does not, without it (6.0 G) it does.
DEFAULT_BUDGET = {"cpu": 2**24, "gpu": 7 * 10**9}
DEFAULT_CLIENT_QUEUE = 2  # in public mode: requests one client may have waiting or running at a time
DEFAULT_GENERATE_SLOTS = 16  # Generate requests admitted at once (the rest wait in Gradio's queue)


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip().lower() in TRUE_WORDS


def public_mode() -> bool:
    """``MAGCACHE_PUBLIC`` when set, else on where ``SPACE_ID`` is set (a Hugging Face Space)."""
    flag = _flag("MAGCACHE_PUBLIC")
    return flag if flag is not None else bool(os.environ.get("SPACE_ID"))


def shared_calibrations() -> bool:
    """``MAGCACHE_SHARED_CALIBRATIONS=1``: in public mode too, every visitor reads and writes one store."""
    return bool(_flag("MAGCACHE_SHARED_CALIBRATIONS"))


def _env_number(name: str, default: float, cast: type = int) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(float(raw))
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {raw!r}")
    return value


# --------------------------------------------------------------------------------------------------
# Strict parsing of the fields an API client sends
# --------------------------------------------------------------------------------------------------
def parse_flag(value: Any, label: str) -> bool:
    """A checkbox value: a bool, 0 / 1, or one of true/false, yes/no, on/off, 1/0 (any case). Anything else is
    refused: ``bool("false")`` is True, so text is never read with ``bool``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise InvalidRequest(f"{label} must be true or false, got {_show(value)}.")


def check_text(value: Any, label: str, limit: int = MAX_PROMPT_CHARS) -> str | None:
    """Text a user typed: a string (or None) of valid Unicode without NUL characters, at most ``limit`` long."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{label} must be text, got {type(value).__name__}.")
    if len(value) > limit:
        raise InvalidRequest(f"{label} is too long ({len(value)} characters; the limit is {limit}).")
    if "\x00" in value:
        raise InvalidRequest(f"{label} contains a NUL character; remove it.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{label} contains characters that are not valid Unicode text (a lone surrogate, e.g. half "
                      "of an emoji cut in two); retype it.") from None
    return value


def strict_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every text, path and checkbox field checked and the checkboxes as real booleans; a field
    that does not parse raises :class:`InvalidRequest` naming it. Numbers are parsed by the handler (which names them)."""
    out = dict(values)
    for name, label in TEXT_FIELDS.items():
        if name in out:
            out[name] = check_text(out[name], label)
    for name, label in PATH_FIELDS.items():
        if name in out:
            out[name] = check_text(out[name], label, MAX_PATH_CHARS)
    for name, label in FLAG_FIELDS.items():
        if name in out and out[name] is not None:
            out[name] = parse_flag(out[name], label)
    return out


def check_source(weights: str | None, base: str | None) -> None:
    """Public mode: the model comes from the catalog only (no server path, no hub id from a visitor)."""
    if not public_mode():
        return
    given = [label for label, value in (("Weights", weights), ("Base pipeline", base)) if (value or "").strip()]
    if given:
        raise InvalidRequest(f"This is a public instance: the {' and '.join(given)} field{'s' if len(given) > 1 else ''} "
                      "cannot be set here; every tab runs its catalog model (pick a Model variant). Run a private "
                      "instance (see docs/reliability.md) to load other weights.")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------------
# The compute budget
# --------------------------------------------------------------------------------------------------
def device_kind(device: str) -> str:
    return "cpu" if str(device).startswith("cpu") else "gpu"


def budget(device: str) -> int:
    """The largest work one request may ask for on ``device`` (``MAGCACHE_BUDGET_CPU`` / ``MAGCACHE_BUDGET_GPU``;
    0 = no limit). Default: :data:`DEFAULT_BUDGET` in public mode, no limit otherwise (a local user waits for
    their own runs)."""
    kind = device_kind(device)
    return _env_number(f"MAGCACHE_BUDGET_{kind.upper()}", DEFAULT_BUDGET[kind] if public_mode() else 0)


@dataclass(frozen=True)
class Work:
    width: int
    height: int
    frames: int
    steps: int
    runs: int
    passes: int

    @property
    def total(self) -> int:
        return self.width * self.height * self.frames * self.steps * self.runs * self.passes

    def describe(self) -> str:
        frames = f" x {self.frames} frames" if self.frames > 1 else ""
        return (f"{self.width}x{self.height}{frames} x {self.steps} steps x {self.runs} run"
                f"{'s' if self.runs > 1 else ''} x {self.passes} pass{'es' if self.passes > 1 else ''} per step")


def request_work(tab: Tab, req: Any, defaults: Mapping[str, Any], runs: int | None = None) -> Work:
    """What ``req`` (a ``GenerationRequest``, unset fields filled from ``defaults``) costs. ``runs``: full
    denoising runs (default: 2 with the baseline comparison, else 1). Tabs without a size input count the
    default size (or 1024x1024: an edited image is about one megapixel)."""

    def whole(name: str, default_key: str, fallback: int) -> int:
        value = getattr(req, name)
        if value is None:
            value = defaults.get(default_key)
        try:
            return max(int(value), 1)
        except (TypeError, ValueError, OverflowError):
            return fallback  # not a number: validation refuses it with its own message

    steps = whole("num_inference_steps", "num_inference_steps", 1)
    frames = whole("num_frames", "num_frames", 1) if "frames" in tab.inputs else 1
    guidance = req.guidance_scale if req.guidance_scale is not None else defaults.get("guidance_scale")
    try:
        passes = tab.num_branches(float(guidance) if guidance is not None else None)
    except (TypeError, ValueError):
        passes = 1
    runs = runs if runs is not None else (2 if req.compare else 1)
    return Work(whole("width", "width", 1024), whole("height", "height", 1024), frames, steps, runs, passes)


def check_budget(tab: Tab, work: Work, device: str) -> None:
    """Refuse ``work`` beyond the device's budget, saying what it costs, the limit, and what to change."""
    limit = budget(device)
    if not limit or work.total <= limit:
        return
    tips = ["fewer steps", "a smaller size"]
    if work.frames > 1:
        tips.insert(1, "fewer frames")
    if work.runs > 1:
        tips.insert(0, "turn off Compare with baseline (halves the work)")
    kind = device_kind(device)
    raise InvalidRequest(f"This request is over this server's compute budget: {work.describe()} = {work.total:,} "
                  f"pixel-steps; the limit on this {kind.upper()} is {limit:,} (MAGCACHE_BUDGET_{kind.upper()}). "
                  f"To fit, {', '.join(tips)}.")


# --------------------------------------------------------------------------------------------------
# Requests per client
# --------------------------------------------------------------------------------------------------
def client_queue_limit() -> int:
    """``MAGCACHE_CLIENT_QUEUE``: requests one client may have waiting or running (0 = no limit). Default: 2 in
    public mode, no limit otherwise (one local user may well queue many)."""
    return _env_number("MAGCACHE_CLIENT_QUEUE", DEFAULT_CLIENT_QUEUE if public_mode() else 0)


def generate_slots() -> int:
    """``MAGCACHE_GENERATE_SLOTS``: Generate requests admitted at once; they validate at once and then wait for
    the device in arrival order (``ModelManager.device_slot``). More wait in Gradio's queue."""
    return max(1, _env_number("MAGCACHE_GENERATE_SLOTS", DEFAULT_GENERATE_SLOTS))


def client_id(request: Any) -> str:
    """Who sent ``request`` (an object with ``client.host`` and ``headers``, as ``gr.Request`` has): the peer
    address, or behind the Spaces proxy (public mode) the address that proxy appended last to
    ``X-Forwarded-For`` (earlier entries come from the client and can be anything)."""
    host = getattr(getattr(request, "client", None), "host", None) or "local"
    if public_mode():
        headers = getattr(request, "headers", None) or {}
        forwarded = headers.get("x-forwarded-for") if hasattr(headers, "get") else None
        if forwarded:
            host = forwarded.split(",")[-1].strip() or host
    return host


def admission(tab: Tab, req: Any, defaults: Mapping[str, Any], device: str, client: str | None,
              runs: int | None = None):
    """Context manager around one request, entered before it waits for the device (``jobs.device_job`` enters
    it with the validated request): the work fits the budget and ``client`` has a free place (:data:`CLIENTS`),
    kept until the job ends. Raises ``InvalidRequest`` at once otherwise."""
    check_budget(tab, request_work(tab, req, defaults, runs), device)
    return CLIENTS.admit(client)


class ClientLimiter:
    """Counts each client's requests between admission and the end of the run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}

    @contextlib.contextmanager
    def admit(self, client: str | None) -> Iterator[None]:
        """Count a request of ``client`` (None: a run no client is named for, such as a calibration, is not counted)."""
        limit = client_queue_limit()
        if client is None:
            yield
            return
        key = client
        with self._lock:
            if limit and self._active.get(key, 0) >= limit:
                raise InvalidRequest(f"You already have {self._active[key]} request{'s' if self._active[key] > 1 else ''} "
                              f"waiting or running on this server (the limit is {limit} per client, "
                              "MAGCACHE_CLIENT_QUEUE): wait for one to finish, or stop it.")
            self._active[key] = self._active.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._active[key] -= 1
                if not self._active[key]:
                    del self._active[key]

    def active(self, client: str) -> int:
        with self._lock:
            return self._active.get(client, 0)


CLIENTS = ClientLimiter()  # one per process: every tab and event counts against the same client


# --------------------------------------------------------------------------------------------------
# Calibrations per visitor
# --------------------------------------------------------------------------------------------------
def session_root() -> Path:
    """Where per-visitor stores live (``MAGCACHE_SESSION_DIR``; default a folder in the temp dir). The app's
    housekeeping deletes what has not been touched for a while."""
    return Path(os.environ.get("MAGCACHE_SESSION_DIR") or Path(tempfile.gettempdir()) / "magcache-sessions")


def current_session() -> str | None:
    """The visitor's session of the event running in this thread, from the provider the UI registered
    (:func:`read_sessions_with`; None outside an event or without a UI), so backend code needs no request argument
    to find the visitor's store."""
    try:
        return _session_provider() or None
    except Exception:  # noqa: BLE001 - a provider that cannot tell: no session
        return None


def _no_session() -> str | None:
    return None


_session_provider: Callable[[], str | None] = _no_session


def read_sessions_with(provider: Callable[[], str | None]) -> None:
    """Register how to find the running event's session (the UI knows its web framework; this module does not)."""
    global _session_provider
    _session_provider = provider


def calibration_root(session: str | None = None) -> Path:
    """Where this visitor's calibrations live: the user store locally (or in public mode with
    ``MAGCACHE_SHARED_CALIBRATIONS=1``), else one folder per session (``session``, default the running event's),
    named by a hash so a session id never becomes a path. Without a session, an empty private folder."""
    if not public_mode() or shared_calibrations():
        return default_store_dir()
    session = session or current_session() or "no-session"
    name = hashlib.sha256(session.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return session_root() / name / "calibrations"

