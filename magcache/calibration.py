"""Calibrations: a model's measured ratio curves, validated, kept in a user store.

A :class:`Calibration` is one run of a pipeline with nothing skipped (``magcache.apply(..., calibrate=True)``;
:func:`magcache.measure.calibrate` runs one), recorded per CFG branch as ``mag_ratios`` (the curve MagCache uses),
``mag_std`` and ``cos_dis`` (diagnostics of the "magnitude law"), together with what the curve depends on: model,
step count, resolution, scheduler, CFG.

A :class:`CalibrationStore` keeps calibrations as small, human-readable JSON files in a user data directory
(``$MAGCACHE_HOME/calibrations``, else the platform's user data dir, e.g.
``~/.local/share/magcache-studio/calibrations``). File names are generated ids, never taken from user input.
:meth:`CalibrationStore.best_match` finds the calibration for a run: an exact match of model, steps, resolution
bucket, scheduler and CFG, else the nearest one of the same model (same scheduler preferred, then nearest step
count, then nearest resolution); the runtime resamples its curve to the run's step count with
:func:`magcache.policy.nearest_interp`. Which curve a run uses is decided in :mod:`magcache.curves`.

Everything read from a file is validated before anything is written (:func:`parse_calibration`): size limit,
schema, finite positive ratios, lengths consistent with ``num_steps`` and the branches, safe ids and names.
"""

from __future__ import annotations

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
from typing import Any, Mapping, NamedTuple, Sequence

from . import policy as P
from .jsonfile import MAX_FILE_BYTES, check_header, dumps_readable, load_json_text
from .presets import get_preset

logger = logging.getLogger("magcache.calibration")

FORMAT = "magcache-studio calibration"
VERSION = 1
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


# --------------------------------------------------------------------------------------------------
# Validation (everything read from disk or from a user goes through here)
# --------------------------------------------------------------------------------------------------
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
    check_header(data, FORMAT, VERSION, _TOP_KEYS, "calibration file")
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

    def __init__(self, root: str | os.PathLike | None = None, *, cached: bool = False):
        """``cached``: read the directory once and keep the records in memory (the app's live preview asks for
        the best match on every slider move); this store's own writes and :meth:`refresh` renew them."""
        self.root = Path(root) if root is not None else default_store_dir()
        self.problems: list[str] = []  # files skipped by the last read of the directory, with the reason
        self.cached = cached
        self._records: list[Calibration] | None = None

    def refresh(self) -> None:
        """Forget the records kept in memory (files saved by another process show on the next read)."""
        self._records = None

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
        self.refresh()
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
        self.refresh()

    def list(self, model: str | None = None) -> list[Calibration]:
        """Valid calibrations, newest first (optionally of one model). Bad files are skipped and named in
        ``self.problems``, so one broken file never hides the others."""
        if not self.cached or self._records is None:
            self._records = self._read_all()
        return [c for c in self._records if model is None or c.model == model]

    def _read_all(self) -> list[Calibration]:
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
# From recorded runs to a record
# --------------------------------------------------------------------------------------------------
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
