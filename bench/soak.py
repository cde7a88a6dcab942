"""Disk soak: video runs through the real server, one after another, while the app's housekeeping sweeps on a short
schedule; the disk use of its output folder and Gradio's upload / cache folder must stay flat.

    python -m bench.soak                              # 24 video runs, sweep every 2 s, files kept 4 s
    python -m bench.soak --runs 60 --json soak.json

Starts ``app.py`` (``MAGCACHE_TINY=1``) on a free loopback port with its own output and Gradio folders, runs the
tiny Wan text-to-video tab (each run writes three MP4s, and Gradio copies each into its cache), and measures the
two folders after every run. Bounded: at most 200 runs, a wall-clock deadline, and the app is stopped at the end.
Passes when the disk use after each run of the last quarter is at most ``--bound-mb``, while the runs wrote more
than twice that in all (so a folder that only grows would fail).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.loadtest import start_app
from magcache.studio.housekeeping import disk_use

MAX_RUNS = 200
TAB = "wan_t2v"


@dataclass
class SoakReport:
    runs: int
    every_s: float
    max_age_s: float
    samples_kb: list[float] = field(default_factory=list)  # after each run: output folder + Gradio's folder
    written_kb: float = 0.0  # what the runs wrote in all (MP4s in the outputs and the copies Gradio served)
    wall_s: float = 0.0
    bound_kb: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def text(self) -> str:
        s = self.samples_kb
        return "\n".join([
            f"disk soak: {self.runs} {TAB} runs, sweep every {self.every_s:g} s, files kept {self.max_age_s:g} s",
            f"disk use (outputs + Gradio folder) after each run, KB: first {s[0]:.0f}, max {max(s):.0f}, "
            f"last {s[-1]:.0f}; written in all: {self.written_kb:.0f} KB" if s else "no samples",
            f"wall time {self.wall_s:.1f} s",
            *[f"PROBLEM {p}" for p in self.problems],
            "PASS" if self.passed else "FAIL"])


def soak(runs: int = 24, every_s: float = 2.0, max_age_s: float = 4.0, bound_mb: float = 1.5,
         deadline_s: float = 600.0, folder: Path | None = None) -> SoakReport:
    from gradio_client import Client

    runs = max(1, min(runs, MAX_RUNS))
    report = SoakReport(runs, every_s, max_age_s, bound_kb=bound_mb * 1024)
    folder = Path(folder or tempfile.mkdtemp(prefix="magcache-soak-"))
    outputs, gradio_dir = folder / "app-outputs", folder / "gradio"
    env = {"MAGCACHE_CLEANUP_EVERY_S": str(every_s), "MAGCACHE_MAX_FILE_AGE_S": str(max_age_s),
           "GRADIO_TEMP_DIR": str(gradio_dir)}
    t0 = time.monotonic()
    seen: set[Path] = set()
    with start_app(folder / "app.log", env=env) as url:
        client = Client(url, verbose=False, download_files=False)  # nothing piles up on the client's side
        try:
            for i in range(runs):
                if time.monotonic() - t0 > deadline_s:
                    report.problems.append(f"deadline of {deadline_s:.0f} s reached after {i} runs")
                    break
                client.predict(prompt="a cat", seed=i, steps=4, api_name=f"/generate_{TAB}")
                for f in list(outputs.rglob("*.mp4")) + list(gradio_dir.rglob("*.mp4")):
                    if f not in seen:
                        seen.add(f)
                        report.written_kb += f.stat().st_size / 1024 if f.exists() else 0
                report.samples_kb.append(disk_use([outputs, gradio_dir]) / 1024)
        finally:
            client.close()
    report.wall_s = time.monotonic() - t0
    tail = report.samples_kb[-max(1, len(report.samples_kb) // 4):]
    if max(tail, default=0) > report.bound_kb:
        report.problems.append(f"disk use reached {max(tail):.0f} KB at the end, above the bound of "
                               f"{report.bound_kb:.0f} KB")
    if report.written_kb <= 2 * report.bound_kb:
        report.problems.append(f"the runs wrote {report.written_kb:.0f} KB, too little to tell a bounded folder from "
                               "a growing one (more runs, or a lower bound)")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=24)
    ap.add_argument("--every", type=float, default=2.0, help="seconds between sweeps (MAGCACHE_CLEANUP_EVERY_S)")
    ap.add_argument("--max-age", type=float, default=4.0, help="seconds files are kept (MAGCACHE_MAX_FILE_AGE_S)")
    ap.add_argument("--bound-mb", type=float, default=1.5, help="largest disk use allowed in the last quarter")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    report = soak(args.runs, args.every, args.max_age, args.bound_mb)
    print(report.text())
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
