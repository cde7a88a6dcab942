"""``python -m magcache schedule``, run as a user would (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from magcache.policy import simulate
from magcache.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magcache", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def _schedule_json(*args: str) -> dict:
    proc = _cli("schedule", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # the whole of stdout is ONE JSON object


def test_json_at_reference_defaults_for_the_image_presets():
    out = _schedule_json("--preset", "flux", "--steps", "28")
    assert out["computed"] == {"cond": [0, 1, 2, 5, 9, 11, 17, 23, 26]}
    assert (out["thresh"], out["retention_ratio"], out["K"]) == (0.24, 0.1, 5)  # omitted -> preset defaults
    out = _schedule_json("--preset", "flux_kontext", "--steps", "28")
    assert len(out["computed"]["cond"]) == 14 and set(out["computed"]) == {"cond"}
    out = _schedule_json("--preset", "chroma", "--steps", "26")
    expected = [0, 1, 2, 3, 4, 5, 7, 10, 13, 16, 19, 22, 24]
    assert out["computed"] == {"cond": expected, "uncond": expected}


def test_json_with_explicit_parameters_equals_the_policy():
    out = _schedule_json("--preset", "wan2.1_t2v_1.3B", "--steps", "30", "--thresh", "0.05", "--retention", "0.3",
                         "--K", "3")
    p = get_preset("wan2.1_t2v_1.3B")
    expected = simulate(p.curves, 30, p.settings(thresh=0.05, retention_ratio=0.3, K=3), p.rules, 2).computed
    assert out["computed"] == expected
    for steps in out["computed"].values():
        assert steps == sorted(set(steps)) and all(0 <= s < 30 for s in steps)
    # --steps omitted: the preset's calibrated step count
    assert _schedule_json("--preset", "framepack")["steps"] == 25


def test_human_readable_output():
    proc = _cli("schedule", "--preset", "flux", "--steps", "28")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    cond = next(line for line in lines if line.strip().startswith("cond"))
    assert "###..#...#.#.....#.....#..#." in cond and "computed 9/28" in cond
    assert "thresh 0.24" in proc.stdout and "3.11x" in proc.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(proc.stdout)


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown MagCache preset 'nope'"),
    (["--preset", "flux", "--steps", "0"], "--steps must be >= 1"),
    (["--preset", "flux", "--thresh", "nan"], "thresh must be a finite number"),
    (["--preset", "flux", "--retention", "1.5"], "retention_ratio must be between 0 and 1"),
])
def test_bad_input_exits_2_with_a_clear_message(args, message):
    proc = _cli("schedule", *args, "--json")
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stdout == ""


def test_presets_listing():
    proc = _cli("presets", "--json")
    assert proc.returncode == 0, proc.stderr
    ids = {row["id"] for row in json.loads(proc.stdout)}
    assert {"flux", "flux_kontext", "chroma", "wan2.1_vace_1.3B", "framepack_f1"} <= ids
