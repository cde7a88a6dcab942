"""Calibrations: measure a model's ratio curves once, keep them in a user store, pick the best one for a run.

A :class:`Calibration` is one run of a pipeline with nothing skipped (``magcache.apply(..., calibrate=True)``),
recorded per CFG branch as ``mag_ratios`` (the curve MagCache uses), ``mag_std`` and ``cos_dis`` (diagnostics of
the "magnitude law"), together with what the curve depends on: model, step count, resolution, scheduler, CFG.

A :class:`CalibrationStore` keeps calibrations as small, human-readable JSON files in a user data directory
(``$MAGCACHE_HOME/calibrations``, else the platform's user data dir, e.g.
``~/.local/share/magcache-studio/calibrations``). File names are generated ids, never taken from user input.
:meth:`CalibrationStore.best_match` finds the calibration for a run: an exact match of model, steps, resolution
bucket, scheduler and CFG, else the nearest one of the same model (same scheduler preferred, then nearest step
count, then nearest resolution); the runtime resamples its curve to the run's step count with
:func:`magcache.policy.nearest_interp`.

Everything read from a file is validated before anything is written (:func:`parse_calibration`): size limit,
schema, finite positive ratios, lengths consistent with ``num_steps`` and the branches, safe ids and names.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import re
import secrets
import sys
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

from . import policy as P
from .presets import Preset, get_preset

logger = logging.getLogger("magcache.calibration")

FORMAT = "magcache-studio calibration"
VERSION = 1
MAX_FILE_BYTES = 512 * 1024  # a 1000-step CFG calibration is ~100 KB
MAX_STEPS = 1000
MAX_RATIO = 1e6  # ratios are near 1 for real models; random or broken ones can measure hundreds (bf16 GPU run)
MAX_PIXELS_SIDE = 16384
MAX_FRAMES = 10000
CURVE_KEYS = ("mag_ratios", "mag_std", "cos_dis")
RESOLUTION_BUCKET_PX = 64  # heights/widths are compared in 64-px buckets (latent patch grids of most models)
FRAMES_BUCKET = 8

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,159}$")
_SCHEDULER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}( [A-Za-z0-9_.=+-]{1,40}){0,4}$")
_TOP_KEYS = {"format", "version", "id", "model", "preset", "num_steps", "resolution", "scheduler", "cfg", "branches",
             "created_at", "source", "runs"}


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------
class Resolution(NamedTuple):
    """Output size of a run: ``frames`` is 1 for images."""

    height: int
    width: int
    frames: int = 1

    @property
    def bucket(self) -> str:
        """Key for exact matching: sides rounded to 64 px, frames to multiples of 8 (``"1024x1024"``,
        ``"832x480x80f"``)."""
        h, w = (max(1, round(v / RESOLUTION_BUCKET_PX)) * RESOLUTION_BUCKET_PX for v in (self.height, self.width))
        if self.frames <= 1:
            return f"{h}x{w}"
        return f"{h}x{w}x{max(1, round(self.frames / FRAMES_BUCKET)) * FRAMES_BUCKET}f"

    @property
    def voxels(self) -> int:
        return self.height * self.width * max(1, self.frames)

    def label(self) -> str:
        return f"{self.height}x{self.width}" + (f"x{self.frames}f" if self.frames > 1 else "")


def as_resolution(value: Any) -> Resolution:
    """``Resolution`` from a ``Resolution``, ``(h, w)``, ``(h, w, frames)`` or ``{"height", "width", "frames"}``."""
    if isinstance(value, Resolution):
        return value
    if isinstance(value, Mapping):
        value = (value.get("height"), value.get("width"), value.get("frames", 1))
    if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
        raise ValueError(f"resolution must be (height, width) or (height, width, frames), got {value!r}")
    h, w, f = (*value, 1) if len(value) == 2 else value
    limits = (("height", h, MAX_PIXELS_SIDE), ("width", w, MAX_PIXELS_SIDE), ("frames", f, MAX_FRAMES))
    for name, v, top in limits:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise ValueError(f"resolution {name} must be an integer between 1 and {top}, got {v!r}")
    return Resolution(h, w, f)


@dataclass(frozen=True)
class Calibration:
    """One calibration run: per-branch curves (``{"cond": {"mag_ratios": [...], "mag_std": [...], "cos_dis":
    [...]}, "uncond": {...}}``, each of length ``num_steps``, entry 0 the 1.0 padding) and what they depend on."""

    model: str
    preset: str
    num_steps: int
    resolution: Resolution
    scheduler: str
    branches: Mapping[str, Mapping[str, Sequence[float]]]
    created_at: str = ""
    source: str = ""
    runs: int = 1
    id: str = ""

    @property
    def cfg(self) -> bool:
        return len(self.branches) > 1

    @property
    def curves(self) -> list[list[float]]:
        """``mag_ratios`` per branch in runtime order (cond, then uncond), as ``magcache.apply(curves=...)``
        takes them."""
        return [list(self.branches[b]["mag_ratios"]) for b in P.BRANCH_NAMES if b in self.branches]

    def curves_for(self, cfg: bool | None) -> list[list[float]]:
        """Curves for a run with or without CFG: a CFG calibration used without CFG gives only its cond curve;
        a non-CFG one used with CFG gives its cond curve, which the runtime reuses for uncond."""
        curves = self.curves
        return curves[:1] if cfg is False else curves

    def resampled(self, num_steps: int, mapping: str = "nearest") -> list[list[float]]:
        """The curves at ``num_steps`` steps, resampled as the runtime does (``mapping`` = the rules'
        ``step_mapping``)."""
        return [P.resample(c, num_steps, mapping) for c in self.curves]

    def label(self) -> str:
        cfg = "CFG" if self.cfg else "no CFG"
        when = self.created_at[:16].replace("T", " ")
        return f"{self.model} · {self.num_steps} steps · {self.resolution.label()} · {self.scheduler} · {cfg} · {when}"

    def to_dict(self) -> dict:
        r = self.resolution
        return {
            "format": FORMAT,
            "version": VERSION,
            "id": self.id,
            "model": self.model,
            "preset": self.preset,
            "num_steps": self.num_steps,
            "resolution": {"height": r.height, "width": r.width, "frames": r.frames, "bucket": r.bucket},
            "scheduler": self.scheduler,
            "cfg": self.cfg,
            "runs": self.runs,
            "created_at": self.created_at,
            "source": self.source,
            "branches": {b: {k: list(v[k]) for k in CURVE_KEYS} for b, v in self.branches.items()},
        }

    def to_json(self) -> str:
        return dumps_readable(self.to_dict())

    def summary(self) -> dict:
        """JSON-friendly overview for tables and the CLI (no curves)."""
        return {"id": self.id, "model": self.model, "preset": self.preset, "num_steps": self.num_steps,
                "resolution": self.resolution.label(), "bucket": self.resolution.bucket, "scheduler": self.scheduler,
                "cfg": self.cfg, "runs": self.runs, "created_at": self.created_at, "source": self.source}


def dumps_readable(obj: Any) -> str:
    """Indented JSON with each list of numbers on one line, so a file shows one curve per line."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)
    return re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text) + "\n"


# --------------------------------------------------------------------------------------------------
# Validation (everything read from disk or from a user goes through here)
# --------------------------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a calibration file (ratios must be finite numbers)")


def load_json_text(text: str | bytes, what: str = "calibration file") -> Any:
    """``json.loads`` with a size limit and no NaN/Infinity, turning every failure into a ``ValueError``."""
    if isinstance(text, bytes):
        if len(text) > MAX_FILE_BYTES:
            raise ValueError(f"{what} is too large ({len(text)} bytes; the limit is {MAX_FILE_BYTES})")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not UTF-8 text: {e}") from None
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise ValueError(f"{what} is too large (the limit is {MAX_FILE_BYTES} bytes)")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{what} is not valid JSON: {e}") from None


def check_id(value: Any) -> str:
    """A store id: letters, digits, ``.``, ``_``, ``-``; never a path."""
    if not isinstance(value, str) or not _ID_RE.match(value) or ".." in value:
        raise ValueError(f"invalid calibration id {value!r}: ids are letters, digits, '.', '_' and '-' only")
    return value


def check_model_name(value: Any) -> str:
    """Model names are free text (repo ids, paths) but never path traversal or control characters; they are only
    compared and shown, never used to build a path."""
    if not isinstance(value, str) or not 1 <= len(value) <= 300:
        raise ValueError("model must be a non-empty string of at most 300 characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"model name {value!r} contains control characters")
    if ".." in re.split(r"[\\/]", value):
        raise ValueError(f"model name {value!r} looks like a path traversal ('..')")
    return value


def check_preset_id(value: Any) -> str:
    """A shipped preset id (``ValueError`` naming the known ones otherwise)."""
    if not isinstance(value, str):
        raise ValueError("preset must be a preset id string")
    try:
        get_preset(value)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    return value


def _number_list(value: Any, where: str, n: int, positive: bool, upper: float) -> list[float]:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of numbers")
    if len(value) != n:
        raise ValueError(f"{where} has {len(value)} values but num_steps is {n}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{where}[{i}] must be a finite number, got {v!r}")
        if (v <= 0 if positive else v < 0) or v > upper:
            bound = "> 0" if positive else ">= 0"
            raise ValueError(f"{where}[{i}] = {v} is out of range (must be {bound} and <= {upper})")
        out.append(float(v))
    return out


def parse_calibration(data: Any) -> Calibration:
    """Validate a decoded calibration file and build the record; any problem raises ``ValueError`` with a message
    that names the field."""
    if not isinstance(data, dict):
        raise ValueError("a calibration file must hold a JSON object")
    if data.get("format") != FORMAT:
        raise ValueError(f"not a calibration file: 'format' must be {FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != VERSION:
        raise ValueError(f"unsupported calibration version {data.get('version')!r} (this library reads {VERSION})")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ValueError(f"unknown fields in calibration file: {', '.join(sorted(map(str, unknown)))}")
    cal_id = data.get("id", "")
    if cal_id not in ("", None):
        check_id(cal_id)
    model = check_model_name(data.get("model"))
    preset_id = check_preset_id(data.get("preset"))
    n = data.get("num_steps")
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_STEPS:
        raise ValueError(f"num_steps must be an integer between 2 and {MAX_STEPS}, got {n!r}")
    res = data.get("resolution")
    if not isinstance(res, dict) or set(res) - {"height", "width", "frames", "bucket"}:
        raise ValueError("resolution must be an object with height, width and frames")
    resolution = as_resolution(res)
    scheduler = data.get("scheduler")
    if not isinstance(scheduler, str) or not _SCHEDULER_RE.match(scheduler):
        raise ValueError(f"scheduler must be a class name with optional 'key=value' details, got {scheduler!r}")
    branches = data.get("branches")
    if not isinstance(branches, dict) or "cond" not in branches or set(branches) - {"cond", "uncond"}:
        raise ValueError("branches must be an object with 'cond' (and optionally 'uncond') curves")
    parsed: dict[str, dict[str, list[float]]] = {}
    for name in ("cond", "uncond"):
        if name not in branches:
            continue
        b = branches[name]
        if not isinstance(b, dict) or "mag_ratios" not in b or set(b) - set(CURVE_KEYS):
            raise ValueError(f"branches.{name} must be an object with mag_ratios (and mag_std, cos_dis)")
        parsed[name] = {
            "mag_ratios": _number_list(b["mag_ratios"], f"branches.{name}.mag_ratios", n, True, MAX_RATIO),
            "mag_std": _number_list(b.get("mag_std", [0.0] * n), f"branches.{name}.mag_std", n, False, MAX_RATIO),
            "cos_dis": _number_list(b.get("cos_dis", [0.0] * n), f"branches.{name}.cos_dis", n, False, 2.0),
        }
    cfg = data.get("cfg", len(parsed) > 1)
    if not isinstance(cfg, bool) or cfg != (len(parsed) > 1):
        raise ValueError(f"cfg is {cfg!r} but the file has {len(parsed)} branch curve(s); CFG needs cond and uncond")
    created = data.get("created_at", "")
    if not isinstance(created, str) or len(created) > 40:
        raise ValueError("created_at must be an ISO date string")
    if created:
        try:
            datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"created_at {created!r} is not an ISO date") from None
    source = data.get("source", "")
    if not isinstance(source, str) or len(source) > 2000:
        raise ValueError("source must be a string of at most 2000 characters")
    runs = data.get("runs", 1)
    if isinstance(runs, bool) or not isinstance(runs, int) or not 1 <= runs <= 10000:
        raise ValueError(f"runs must be a positive integer, got {runs!r}")
    return Calibration(model, preset_id, n, resolution, scheduler, parsed, created, source, runs, cal_id or "")


def read_calibration_file(path: str | os.PathLike) -> Calibration:
    """Read and validate one calibration file (size checked before reading)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{p.name} is too large ({size} bytes; the limit is {MAX_FILE_BYTES})")
        with p.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ValueError(f"cannot read {p}: {e.strerror or e}") from None
    return parse_calibration(load_json_text(raw, p.name))


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------
def default_store_dir() -> Path:
    """``$MAGCACHE_HOME/calibrations``, else the user data dir: ``$XDG_DATA_HOME`` or ``~/.local/share`` on Linux,
    ``~/Library/Application Support`` on macOS, ``%LOCALAPPDATA%`` on Windows (+ ``magcache-studio/calibrations``)."""
    home = os.environ.get("MAGCACHE_HOME")
    if home:
        return Path(home).expanduser() / "calibrations"
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "magcache-studio" / "calibrations"


def new_calibration_id(cal: Calibration) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cal.model).strip("-").lower()[-40:].strip("-") or "model"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    cfg = "cfg" if cal.cfg else "nocfg"
    return check_id(f"{slug}-{cal.num_steps}s-{cal.resolution.bucket}-{cfg}-{stamp}-{secrets.token_hex(3)}")


class Match(NamedTuple):
    """Result of :meth:`CalibrationStore.best_match`: ``(None, None)`` when the store has nothing for the model."""

    calibration: Calibration | None
    how: str | None


class CalibrationStore:
    """Calibration JSON files in one directory (created on first save)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_store_dir()
        self.problems: list[str] = []  # files skipped by the last list(), with the reason

    # ---- files -----------------------------------------------------------------------------------
    def path_for(self, cal_id: str) -> Path:
        path = self.root / f"{check_id(cal_id)}.json"
        if path.parent != self.root:
            raise ValueError(f"invalid calibration id {cal_id!r}")
        return path

    def save(self, cal: Calibration) -> Calibration:
        """Write ``cal`` (validated first) and return it with its id; a record without an id gets a new one."""
        cal = replace(cal, id=cal.id or new_calibration_id(cal))
        parse_calibration(cal.to_dict())  # never write what we would refuse to read
        path = self.path_for(cal.id)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.root)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(cal.to_json())
            os.replace(tmp, path)  # atomic: readers never see half a file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return cal

    def load(self, cal_id: str) -> Calibration:
        path = self.path_for(cal_id)
        if not path.is_file():
            raise KeyError(f"no calibration {cal_id!r} in {self.root}")
        return replace(read_calibration_file(path), id=cal_id)

    def delete(self, cal_id: str) -> None:
        path = self.path_for(cal_id)
        if not path.is_file():
            raise KeyError(f"no calibration {cal_id!r} in {self.root}")
        path.unlink()

    def list(self, model: str | None = None) -> list[Calibration]:
        """Valid calibrations, newest first (optionally of one model). Bad files are skipped and named in
        ``self.problems``, so one broken file never hides the others."""
        self.problems = []
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.glob("*.json")):
            if path.name.startswith("."):  # our temp files while saving
                continue
            if path.is_symlink() or not _ID_RE.match(path.stem) or ".." in path.stem:
                self.problems.append(f"{path.name}: not a calibration store file (symlink or unsafe name); skipped")
                continue
            try:
                cal = replace(read_calibration_file(path), id=path.stem)
            except ValueError as e:
                self.problems.append(f"{path.name}: {e}")
                logger.warning("skipping calibration file %s: %s", path, e)
                continue
            if model is None or cal.model == model:
                out.append(cal)
        out.sort(key=lambda c: (c.created_at, c.id), reverse=True)
        return out

    # ---- import / export ---------------------------------------------------------------------------
    def import_text(self, text: str | bytes, source_note: str = "") -> Calibration:
        """Validate a calibration JSON document and save it under a new id. Raises ``ValueError`` (nothing
        written) if anything is wrong."""
        cal = parse_calibration(load_json_text(text))
        note = f"imported{(' from ' + source_note) if source_note else ''}"
        source = f"{cal.source} ({note})" if cal.source else note
        return self.save(replace(cal, id="", source=source[:2000]))

    def import_file(self, path: str | os.PathLike) -> Calibration:
        """Validate a calibration file and copy it into the store under a new id; the file's own id and name are
        never used as paths. Raises ``ValueError`` with nothing written if the file is bad."""
        cal = read_calibration_file(path)
        source = f"{cal.source} (imported from {Path(path).name})" if cal.source else f"imported from {Path(path).name}"
        return self.save(replace(cal, id="", source=source[:2000]))

    def export(self, cal: Calibration | str, path: str | os.PathLike | None = None) -> str:
        """The calibration's JSON text (by record or id); also written to ``path`` if given."""
        record = self.load(cal) if isinstance(cal, str) else cal
        text = record.to_json()
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    # ---- matching --------------------------------------------------------------------------------
    def best_match(
        self,
        model: str,
        num_steps: int,
        resolution: Any,
        scheduler: str | None = None,
        cfg: bool | None = None,
    ) -> Match:
        """The calibration to use for a run: an exact match (model, steps, resolution bucket, scheduler, CFG;
        newest first), else the nearest of the same model, ranked by: same scheduler (then same scheduler class),
        nearest step count, nearest resolution (by pixel count), same CFG, newest. ``scheduler``/``cfg`` ``None``
        mean "any". Returns ``Match(calibration, how)`` with ``how`` = ``"exact"`` or ``"nearest (...)"``
        saying what differs, or ``Match(None, None)``."""
        res = as_resolution(resolution)
        candidates = self.list(model)
        if not candidates:
            return Match(None, None)

        def scheduler_rank(c: Calibration) -> int:
            if scheduler is None or c.scheduler == scheduler:
                return 0
            return 1 if c.scheduler.split(" ")[0] == scheduler.split(" ")[0] else 2

        def distance(c: Calibration) -> tuple:
            return (
                scheduler_rank(c),
                abs(c.num_steps - num_steps),
                abs(math.log(c.resolution.voxels / res.voxels)),
                0 if cfg is None or c.cfg == cfg else 1,
            )

        # list() is newest first and sorted() is stable, so ties go to the newest calibration
        best = sorted(candidates, key=distance)[0]
        exact = (scheduler_rank(best) == 0 and best.num_steps == num_steps and best.resolution.bucket == res.bucket
                 and (cfg is None or best.cfg == cfg))
        if exact:
            return Match(best, "exact")
        differences = []
        if best.num_steps != num_steps:
            differences.append(f"resampled from {best.num_steps} steps")
        if best.resolution.bucket != res.bucket:
            differences.append(f"calibrated at {best.resolution.label()}, run at {res.label()}")
        if scheduler_rank(best):
            differences.append(f"scheduler {best.scheduler}, run uses {scheduler}")
        if cfg is not None and best.cfg != cfg:
            differences.append("calibrated with CFG, run without" if best.cfg else "calibrated without CFG, run with CFG")
        return Match(best, f"nearest ({'; '.join(differences)})")


# --------------------------------------------------------------------------------------------------
# Choosing the curve for a run
# --------------------------------------------------------------------------------------------------
def rules_for_calibration(rules: P.Rules) -> P.Rules:
    """Rules to use with a calibrated curve: the preset's rules without its guarded steps, which mark dips of the
    published curve (FLUX's step 11) and do not carry over to a new calibration."""
    return replace(rules, guarded_steps=())


@dataclass(frozen=True)
class CurveChoice:
    """The curve a run uses and where it came from, for ``magcache.apply(curves=..., rules=...)`` and the UI."""

    preset: str
    curves: list[list[float]]
    rules: P.Rules
    label: str  # one sentence for the UI: which curve and where it came from
    calibration: Calibration | None = None
    how: str | None = None  # "exact" / "nearest (...)" for a calibration; None for the preset curve

    @property
    def from_calibration(self) -> bool:
        return self.calibration is not None


def choose_curves(
    preset: str | Preset,
    model: str,
    num_steps: int,
    resolution: Any,
    scheduler: str | None = None,
    cfg: bool | None = None,
    store: CalibrationStore | None = None,
) -> CurveChoice:
    """The best calibration of ``model`` in ``store`` (default store if ``None``), else the preset's published
    curve; for a calibrate-first preset (no published curve) without a calibration, no curve (``curves == []``:
    MagCache stays off)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    match = (store if store is not None else CalibrationStore()).best_match(model, num_steps, resolution, scheduler, cfg)
    if match.calibration is None and p.calibrate_first:
        label = (f"no calibration of {model} for {num_steps} steps at this resolution, and {p.model.split(' (')[0]} "
                 "has no published curve: MagCache is off until you calibrate it")
        return CurveChoice(p.id, [], p.rules, label)
    if match.calibration is None:
        curves = [list(c) for c in p.curves_for(num_steps)]  # HunyuanVideo-1.5: its 40-step curve above 20 steps
        steps = "" if len(curves[0]) == num_steps else f", resampled from {len(curves[0])} steps"
        label = f"preset {p.id!r} curve ({p.source or p.rules_source}{steps})"
        return CurveChoice(p.id, curves, p.rules, label)
    cal = match.calibration
    label = f"calibration {cal.id} ({match.how}): {cal.label()}"
    return CurveChoice(p.id, cal.curves_for(cfg), rules_for_calibration(p.rules), label, cal, match.how)


# --------------------------------------------------------------------------------------------------
# Describing a pipeline run (model, scheduler, resolution, CFG)
# --------------------------------------------------------------------------------------------------
def model_id(pipe: Any) -> str:
    """A stable name for the loaded model: its repo id or (absolute) local path, else the pipeline and transformer
    classes plus a hash of the transformer config (pipelines built in code)."""
    name = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if isinstance(name, str) and name:
        return os.path.realpath(name) if os.path.isdir(name) else name
    transformer = getattr(pipe, "transformer", pipe)
    config = dict(getattr(transformer, "config", {}) or {})
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{type(pipe).__name__}:{type(transformer).__name__}:{digest}"


def scheduler_label(scheduler: Any) -> str:
    """Class name plus the setting that shapes the sigmas most: ``"FlowMatchEulerDiscreteScheduler shift=3"``,
    ``"... dynamic-shift"`` (FLUX: the shift follows the resolution), ``"UniPCMultistepScheduler flow_shift=3"``."""
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", {}) or {}
    if config.get("use_dynamic_shifting"):
        return f"{name} dynamic-shift"
    if config.get("use_flow_sigmas") and config.get("flow_shift") is not None:
        return f"{name} flow_shift={float(config['flow_shift']):g}"
    if config.get("shift") is not None:
        return f"{name} shift={float(config['shift']):g}"
    return name


def _call_default(pipe: Any, name: str) -> Any:
    try:
        param = inspect.signature(type(pipe).__call__).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def run_resolution(pipe: Any, call_kwargs: Mapping[str, Any]) -> Resolution | None:
    """Height/width/frames of a call from its arguments, else the pipeline's defaults; ``None`` if unknown."""
    h = call_kwargs.get("height") or _call_default(pipe, "height")
    w = call_kwargs.get("width") or _call_default(pipe, "width")
    if h is None or w is None:
        size = getattr(pipe, "default_sample_size", None)
        scale = getattr(pipe, "vae_scale_factor", None)
        if isinstance(size, int) and isinstance(scale, int):
            h, w = h or size * scale, w or size * scale
    if h is None or w is None:
        return None
    frames = call_kwargs.get("num_frames") or _call_default(pipe, "num_frames") or 1
    return as_resolution((int(h), int(w), int(frames)))


def expects_cfg(pipe: Any, call_kwargs: Mapping[str, Any]) -> bool:
    """Whether a call will run two transformer branches (true CFG). Pipelines with ``true_cfg_scale`` (FLUX,
    Kontext, HunyuanVideo, FramePack) need it > 1 and a negative prompt; guidance-distilled transformers
    (``guidance_embeds``) embed ``guidance_scale`` instead; the others (Wan, Chroma) run CFG when
    ``guidance_scale`` > 1."""
    if _call_default(pipe, "true_cfg_scale") is not None or "true_cfg_scale" in call_kwargs:
        scale = call_kwargs.get("true_cfg_scale", _call_default(pipe, "true_cfg_scale")) or 1.0
        negative = call_kwargs.get("negative_prompt") is not None or call_kwargs.get("negative_prompt_embeds") is not None
        return scale > 1 and negative
    transformer = getattr(pipe, "transformer", None)
    if getattr(getattr(transformer, "config", None), "guidance_embeds", False):
        return False
    scale = call_kwargs.get("guidance_scale", _call_default(pipe, "guidance_scale"))
    return scale is not None and scale > 1


@dataclass(frozen=True)
class RunKey:
    """What a calibration is keyed by, for one pipeline call."""

    model: str
    num_steps: int
    resolution: Resolution
    scheduler: str
    cfg: bool


def run_key(pipe: Any, call_kwargs: Mapping[str, Any], model: str | None = None) -> RunKey:
    steps = call_kwargs.get("num_inference_steps") or _call_default(pipe, "num_inference_steps")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError("call_kwargs need num_inference_steps")
    res = run_resolution(pipe, call_kwargs)
    if res is None:
        raise ValueError("cannot tell the output size of this call; pass height and width")
    return RunKey(model or model_id(pipe), steps, res, scheduler_label(pipe.scheduler), expects_cfg(pipe, call_kwargs))


def apply_best(
    pipe: Any,
    call_kwargs: Mapping[str, Any],
    *,
    store: CalibrationStore | None = None,
    preset: str | None = None,
    model: str | None = None,
    **apply_kwargs: Any,
):
    """``magcache.apply`` with the best-matching calibration for this call (else the preset curve). Returns
    ``(handle, CurveChoice)``; ``choice.label`` says which curve is in use and where it came from."""
    from .adapters import adapter_for
    from .runtime import apply

    key = run_key(pipe, call_kwargs, model)
    preset_id = preset or adapter_for(pipe.transformer).preset_for(pipe, pipe.transformer)
    choice = choose_curves(preset_id, key.model, key.num_steps, key.resolution, key.scheduler, key.cfg, store)
    handle = apply(pipe, preset_id, curves=choice.curves or None, rules=choice.rules, **apply_kwargs)
    return handle, choice


# --------------------------------------------------------------------------------------------------
# Running a calibration
# --------------------------------------------------------------------------------------------------
def _output_resolution(result: Any) -> Resolution | None:
    from .metrics import to_frames

    out = getattr(result, "images", None)
    if out is None:
        out = getattr(result, "frames", None)
    if out is None:
        return None
    try:
        frames = to_frames(out[0] if hasattr(out, "__len__") and len(out) == 1 else out)
    except (ValueError, TypeError):
        return None
    n, _, h, w = frames.shape
    return Resolution(int(h), int(w), int(n))


@contextlib.contextmanager
def new_runs_of(handle: Any) -> Iterator[list]:
    """Collects the runs a handle records inside the ``with`` block (the handle keeps a bounded list, so runs are
    told apart by identity, not by index; the earlier ones are kept alive so no id is reused)."""
    earlier = list(handle.runs)
    known = {id(r) for r in earlier}
    collected: list = []
    try:
        yield collected
    finally:
        collected.extend(r for r in handle.runs if id(r) not in known)


def average_runs(runs: Sequence[Any]) -> dict[str, dict[str, list[float]]]:
    """Per-branch curves averaged over calibration runs of one length (FramePack records one run per section),
    rounded to 5 decimals like the reference calibrations."""
    branches: dict[str, dict[str, list[float]]] = {}
    n = runs[-1].num_steps
    for name in runs[-1].branches:
        per = [r.branches[name] for r in runs if name in r.branches]
        branches[name] = {
            key: [round(sum(getattr(s, key)[i] for s in per) / len(per), 5) for i in range(n)] for key in CURVE_KEYS
        }
    return branches


def calibrate(
    pipe: Any,
    call_kwargs: Mapping[str, Any],
    preset: str | None = None,
    *,
    model: str | None = None,
    source: str = "",
) -> Calibration:
    """Run ``pipe(**call_kwargs)`` once with nothing skipped and return the measured curves (not saved; see
    :meth:`CalibrationStore.save`). A MagCache handle already on the pipeline is reused and left as it was (its
    stats keep the calibration run); otherwise one is applied for the run and removed afterwards. ``preset`` is
    recorded with the calibration (default: the handle's, i.e. the model's default preset)."""
    from .runtime import apply, get_handle

    steps = call_kwargs.get("num_inference_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError("calibration needs num_inference_steps >= 2 in call_kwargs")
    if preset is not None:
        get_preset(preset)  # unknown ids fail before the model runs
    handle = get_handle(pipe)
    own_handle = handle is None
    if own_handle:
        handle = apply(pipe, preset, calibrate=True)
    else:
        previous = (handle.calibrate, handle.enabled)
        handle.configure(calibrate=True, enabled=True)
    try:
        with new_runs_of(handle) as new_runs:
            result = pipe(**call_kwargs)
        new_runs = [r for r in new_runs if r.calibrating and r.completed]
    finally:
        if own_handle:
            handle.remove()
        else:
            handle.configure(calibrate=previous[0], enabled=previous[1])
    if not new_runs:
        raise RuntimeError("the calibration call recorded no completed MagCache run; is this a supported pipeline?")
    runs = [r for r in new_runs if r.num_steps == new_runs[-1].num_steps]
    branches = {name: curves for name, curves in average_runs(runs).items() if name in P.BRANCH_NAMES}
    resolution = run_resolution(pipe, call_kwargs) or _output_resolution(result)
    if resolution is None:
        raise ValueError("cannot tell the output size of the calibration run; pass height and width")
    cal = Calibration(
        model=model or model_id(pipe),
        preset=preset or handle.preset.id,
        num_steps=runs[-1].num_steps,
        resolution=resolution,
        scheduler=scheduler_label(pipe.scheduler),
        branches=branches,
        created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        source=source or f"magcache calibrate: {type(pipe).__name__}, {len(runs)} run(s) averaged",
        runs=len(runs),
    )
    return parse_calibration(cal.to_dict())  # the same checks as a file read from disk


# --------------------------------------------------------------------------------------------------
# Command line: python -m magcache calibrate
# --------------------------------------------------------------------------------------------------
def add_calibrate_arguments(parser: Any) -> None:
    """Arguments of ``python -m magcache calibrate`` (wired in ``magcache/__main__.py``)."""
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


def _load_pipeline(args: Any) -> tuple[Any, dict, str]:
    import torch

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


def run_calibrate_command(args: Any) -> int:
    """``python -m magcache calibrate``: one calibration run, printed and optionally written/saved."""
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


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------
def calibration_figure(cal: Calibration, reference: Preset | str | None = None):
    """The measured ratio curve per branch (band: +-1 std over tokens) over the reference curve resampled to the
    same steps, and the cosine distance below. Returns a matplotlib ``Figure`` (no pyplot state)."""
    from matplotlib.figure import Figure

    ref = get_preset(reference) if isinstance(reference, str) else reference
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ratio_ax, cos_ax = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    steps = list(range(cal.num_steps))
    for name, curves in cal.branches.items():
        r, sd = curves["mag_ratios"], curves["mag_std"]
        line, = ratio_ax.plot(steps, r, marker=".", label=f"{name} (calibrated)")
        ratio_ax.fill_between(steps, [a - b for a, b in zip(r, sd)], [a + b for a, b in zip(r, sd)],
                              color=line.get_color(), alpha=0.2, lw=0)
        cos_ax.plot(steps, curves["cos_dis"], marker=".", color=line.get_color(), label=name)
    if ref is not None:
        for i, curve in enumerate(ref.curves):
            ratio_ax.plot(steps, P.resample(curve, cal.num_steps, ref.rules.step_mapping), ls="--", color="gray",
                          alpha=0.9 if i == 0 else 0.5, label=f"{P.branch_name(i)} (preset {ref.id})")
    ratio_ax.axhline(1.0, color="black", lw=0.6, alpha=0.4)
    ratio_ax.set_ylabel("magnitude ratio")
    ratio_ax.legend(fontsize=7, loc="best")
    ratio_ax.set_title(f"{cal.model}: {cal.num_steps} steps, {cal.resolution.label()}", fontsize=10)
    cos_ax.set_ylabel("cosine distance")
    cos_ax.set_xlabel("step")
    for ax in (ratio_ax, cos_ax):
        ax.grid(alpha=0.3)
    return fig
