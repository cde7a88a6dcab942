"""Can the measured speed-up be trusted on a busy machine? The Demo tab's comparison, as Generate runs it
(``magcache.studio.comparison.run_comparison``: warm-up, interleaved baseline / MagCache pairs, median speed-up),
while another process keeps one CPU core busy.

    python -m bench.timing_trust                 # 5 tries at K=0 and 5 at the defaults, one core busy
    python -m bench.timing_trust --tries 3 --no-busy --json bench/results/cpu_timing_trust.json

K=0 skips nothing, so its speed-up is 1 by construction: every try should read 0.85-1.15x. At the demo's defaults
the speed-up cannot exceed the blocks' predicted one (everything outside the blocks costs the same): every try
should stay within 10% of it. The busy loop is a subprocess of this script, bounded in time and ended with it.
Prints every try; the verdicts are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=5, help="comparisons per setting")
    parser.add_argument("--no-busy", action="store_true", help="no busy-loop process (an idle-machine reference)")
    parser.add_argument("--busy-seconds", type=float, default=900, help="upper bound on the busy loop's life")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from magcache.studio.comparison import run_comparison
    from magcache.studio.jobs import cpu_threads
    from magcache.studio.defaults import tab_defaults
    from magcache.studio.manager import ModelManager
    from magcache.studio.request import GenerationRequest

    manager = ModelManager()
    d = tab_defaults(manager, "demo")
    plan = manager.plan("demo")
    busy = None if args.no_busy else subprocess.Popen(
        [sys.executable, "-c", BUSY_LOOP.format(seconds=args.busy_seconds)])
    load = os.getloadavg()
    print(f"machine: {platform.node()} · {os.cpu_count()} CPUs · load average {load[0]:.1f} at start · run threads "
          f"{cpu_threads()} · Demo model: {plan.kind} · "
          f"{'one core busy (pid %d)' % busy.pid if busy else 'no busy loop'}", flush=True)
    rows = []
    try:
        for label, K in (("K=0 (nothing skipped)", 0), (f"defaults (thresh {d['thresh']:g}, K {d['K']})", d["K"])):
            for i in range(args.tries):
                req = GenerationRequest(tab_id="demo", prompt=d["prompt"], seed=d.get("seed", 0), K=K)
                t0 = time.perf_counter()
                r = run_comparison(manager, req)
                wall = time.perf_counter() - t0
                t = r.timing
                if K == 0:
                    ok = 0.85 <= t.speedup <= 1.15
                else:
                    ok = t.speedup <= r.predicted_speedup * 1.10
                row = dict(setting=label, K=K, try_=i + 1, speedup=round(t.speedup, 3),
                           spread=round(t.speedup_spread, 3), pairs=t.pairs,
                           single_run_speedup=round(r.single_run_speedup, 3),
                           predicted=round(r.predicted_speedup, 3), flagged=r.timing_is_noisy, ok=ok,
                           baseline_median_s=round(t.median("baseline"), 3), magcache_median_s=round(t.median("cached"), 3),
                           request_wall_s=round(wall, 1), load_average=round(os.getloadavg()[0], 1))
                rows.append(row)
                print(f"{label:32s} try {i + 1}: {t.speedup:.2f}× ± {t.speedup_spread:.2f} over {t.pairs} pairs "
                      f"(single first pair {r.single_run_speedup:.2f}×; predicted blocks {r.predicted_speedup:.2f}×) "
                      f"{'flagged busy' if r.timing_is_noisy else 'not flagged'} · request {wall:.1f} s · "
                      f"load {row['load_average']} · {'OK' if ok else 'MISSED'}", flush=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    for K in sorted({r["K"] for r in rows}):
        mine = [r for r in rows if r["K"] == K]
        print(f"{mine[0]['setting']}: {sum(r['ok'] for r in mine)}/{len(mine)} tries on target; speed-ups "
              + ", ".join(f"{r['speedup']:.2f}" for r in mine))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(machine=platform.node(), cpus=os.cpu_count(), busy_core=busy is not None, rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
