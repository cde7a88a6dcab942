"""Disk use that stays bounded on a server that runs for weeks: the app's output folder, Gradio's cache (uploads
and the copies of every result it serves) and the per-visitor stores are swept on a schedule.

A sweep deletes every file older than ``max_age_s``, then, while a folder's files still add up to more than
``max_bytes``, the oldest ones, but never a file younger than ``min_age_s`` (a result a browser is about to
fetch, an upload a queued request is about to read); empty folders left behind go too. Settings:
``MAGCACHE_CLEANUP_EVERY_S`` (default 300), ``MAGCACHE_MAX_FILE_AGE_S`` (3600), ``MAGCACHE_MAX_DISK_MB`` (2048,
per folder), see docs/reliability.md.

No Gradio here: ``app.py`` passes the folders.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

logger = logging.getLogger("magcache.studio.housekeeping")

MIN_AGE_S = 120.0


@dataclass
class SweepReport:
    deleted_files: int = 0
    deleted_bytes: int = 0
    kept_bytes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    every_s: float = 300.0
    max_age_s: float = 3600.0
    max_bytes: int = 2048 * 1024**2
    min_age_s: float = MIN_AGE_S

    @classmethod
    def from_env(cls) -> "Limits":
        env = os.environ

        def number(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            try:
                value = float(raw) if raw else default
            except ValueError:
                raise ValueError(f"{name} must be a number, got {raw!r}") from None
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {raw!r}")
            return value

        return cls(every_s=number("MAGCACHE_CLEANUP_EVERY_S", cls.every_s),
                   max_age_s=number("MAGCACHE_MAX_FILE_AGE_S", cls.max_age_s),
                   max_bytes=int(number("MAGCACHE_MAX_DISK_MB", cls.max_bytes / 1024**2) * 1024**2),
                   min_age_s=min(cls.min_age_s, number("MAGCACHE_MAX_FILE_AGE_S", cls.max_age_s)))


def _files(folder: Path) -> list[tuple[float, int, Path]]:
    out = []
    for path in folder.rglob("*"):
        try:
            if path.is_symlink() or not path.is_file():
                continue
            st = path.stat()
        except OSError:  # deleted meanwhile
            continue
        # ctime too: a copy made with shutil.copy2 (Gradio's cache) keeps the source's old mtime
        out.append((max(st.st_mtime, st.st_ctime), st.st_size, path))
    return sorted(out, key=lambda f: f[0])


def sweep(folders: Iterable[str | os.PathLike], limits: Limits, now: float | None = None) -> SweepReport:
    """One pass over ``folders`` (see the module docstring). Missing folders are skipped; files that vanish or
    cannot be deleted meanwhile are left to the next pass."""
    now = time.time() if now is None else now
    report = SweepReport()
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        files = _files(folder)
        total = sum(size for _, size, _ in files)
        for mtime, size, path in files:  # oldest first
            age = now - mtime
            if age <= limits.max_age_s and (total <= limits.max_bytes or age < limits.min_age_s):
                continue
            try:
                path.unlink()
            except OSError:
                continue
            total -= size
            report.deleted_files += 1
            report.deleted_bytes += size
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()),
                          key=lambda p: len(p.parts), reverse=True):
            try:
                if now - sub.stat().st_mtime >= limits.min_age_s:  # a new folder is about to get its file
                    sub.rmdir()  # only empty ones
            except OSError:
                pass
        report.kept_bytes[str(folder)] = total
    return report


def disk_use(folders: Iterable[str | os.PathLike]) -> int:
    return sum(size for folder in map(Path, folders) if folder.is_dir() for _, size, _ in _files(folder))


class Janitor:
    """:func:`sweep` every ``limits.every_s`` seconds in a daemon thread, until :meth:`stop`."""

    def __init__(self, folders: Iterable[str | os.PathLike], limits: Limits | None = None):
        self.folders = [Path(f) for f in folders]
        self.limits = limits or Limits.from_env()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="magcache-housekeeping", daemon=True)

    def start(self) -> "Janitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.limits.every_s):
            try:
                report = sweep(self.folders, self.limits)
            except Exception:  # noqa: BLE001 - a failed pass must not end the schedule
                logger.exception("housekeeping pass failed")
                continue
            if report.deleted_files:
                logger.info("housekeeping: deleted %d files (%.1f MB); kept %s", report.deleted_files,
                            report.deleted_bytes / 1024**2,
                            ", ".join(f"{k}: {v / 1024**2:.1f} MB" for k, v in report.kept_bytes.items()))
