"""The measured schedule search (magcache.studio.schedule_search): the climb on a score whose optimum is known, and
the search on the tiny FLUX pipeline, one branch (distilled) and two (true CFG): never worse than its start, budget,
step 0 and K kept, each schedule measured once, the schedule it returns is the one a direct run takes."""

import json

import numpy as np
import pytest
import torch

import magcache
from magcache.metrics import PSNR_IDENTICAL, psnr
from magcache.runtime import get_handle
from magcache.studio import schedule_search as S
from magcache.studio.tiny import build_tiny_pipeline

CALL = {"num_inference_steps": 8, "height": 32, "width": 32}
CFG = dict(CALL, true_cfg_scale=2.0, negative_prompt="blue")
ITEMS = [("a red circle", 0)]


def _distance_score(target):
    """Minus the distance of a schedule to ``target`` (per branch, step by step): its only optimum is ``target``."""
    calls = []

    def score(computed):
        calls.append(S.schedule_key(computed))
        return -float(sum(abs(a - b) for br in target for a, b in zip(computed[br], target[br])))

    return score, calls


def test_climb_finds_a_known_optimum_exactly_per_branch():
    target = {"cond": [0, 5, 9, 16, 19], "uncond": [0, 2, 11, 13, 19]}
    start = {"cond": [0, 4, 9, 14, 19], "uncond": [0, 4, 9, 14, 19]}  # uniform, 5 of 20
    score, _ = _distance_score(target)
    computed, best, trace, stopped = S.climb(score, start, 20, 20, (-2, -1, 1, 2), per_branch=True)
    assert (computed, best, stopped) == (target, 0.0, "local optimum")
    assert trace[0]["computed"] == start and [t["psnr"] for t in trace] == sorted(t["psnr"] for t in trace)
    # without per-branch moves the branches stay alike, so the optimum is out of reach
    computed, best, _, _ = S.climb(score, start, 20, 20, (-2, -1, 1, 2), per_branch=False)
    assert computed["cond"] == computed["uncond"] and best < 0


def test_climb_stops_when_told_and_at_the_deadline():
    score, calls = _distance_score({"cond": [0, 7, 9]})
    asked = iter([False, False, True])
    computed, best, _, stopped = S.climb(score, {"cond": [0, 3, 6]}, 10, 10, (-1, 1), should_stop=lambda: next(asked))
    assert stopped == "stop" and best >= score({"cond": [0, 3, 6]})
    computed, _, trace, stopped = S.climb(score, {"cond": [0, 3, 6]}, 10, 10, (-1, 1), deadline=0.0)
    assert (computed, stopped, len(trace)) == ({"cond": [0, 3, 6]}, "time", 1)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("flux")


def _check(result, budget, K, num_steps=8):
    for steps in result.computed.values():
        assert len(steps) == budget and steps[0] == 0 and len(set(steps)) == budget
        assert S.max_skips_in_a_row(steps, num_steps) <= K
    for row in result.measured:
        for steps in row["computed"].values():
            assert len(steps) == budget and steps[0] == 0 and S.max_skips_in_a_row(steps, num_steps) <= K
    assert result.psnr >= result.start_psnr and result.psnr >= result.uniform_psnr  # start = uniform here
    measured = {S.schedule_key(r["computed"]): r["psnr_per_item"] for r in result.measured}
    assert result.psnr == pytest.approx(np.mean(measured[S.schedule_key(result.computed)]))


@pytest.mark.parametrize("call, branches", [(CALL, ("cond",)), (CFG, ("cond", "uncond"))])
def test_search_on_the_tiny_pipeline(pipe, monkeypatch, call, branches):
    runs = []
    generate = S.ScheduleScorer.generate
    monkeypatch.setattr(S.ScheduleScorer, "generate", lambda self, p, s: runs.append(1) or generate(self, p, s))
    result = S.search_schedule(pipe, call, ITEMS, 4, K=2, moves=(1, 2), preset="flux")
    assert tuple(result.computed) == branches and result.stopped_by == "local optimum"
    _check(result, 4, 2)
    assert result.start == {b: [0, 2, 5, 7] for b in branches}
    # each schedule measured once: one run per item for the references and for each distinct schedule
    assert len(runs) == len(ITEMS) * (1 + len(result.measured))
    assert get_handle(pipe) is None  # the handle it applied is gone


def test_search_keeps_k_and_an_existing_handle(pipe):
    handle = magcache.apply(pipe, preset="flux", thresh=0.3, K=3)
    try:
        scorer = S.ScheduleScorer(pipe, CALL, ITEMS + [("a green square", 1)])
        result = S.search_schedule(pipe, CALL, scorer.items, 3, K=3, moves=(1, 2), scorer=scorer)
        _check(result, 3, 3)
        assert max(S.max_skips_in_a_row(s, 8) for r in result.measured for s in r["computed"].values()) == 3
        # a start of its own, as one list for every branch; a start that breaks K or moves step 0 is refused
        again = S.search_schedule(pipe, CALL, scorer.items, None, start=result.computed["cond"], K=3, scorer=scorer)
        assert again.start == result.computed and again.psnr >= result.psnr
        with pytest.raises(ValueError, match="K=2"):
            S.search_schedule(pipe, CALL, scorer.items, None, start=[0, 4, 7], K=2, scorer=scorer)
        with pytest.raises(ValueError, match="step 0"):
            S.search_schedule(pipe, CALL, scorer.items, None, start=[1, 4, 7], K=3, scorer=scorer)
        handle.configure(computed_steps=result.computed)
        out = scorer.generate(*ITEMS[0])
        assert handle.last_run.computed == result.computed
        assert min(psnr(out, scorer.references[0]), PSNR_IDENTICAL) == pytest.approx(
            scorer.per_item(result.computed)[0], abs=1e-3)
        scorer.close()
        assert get_handle(pipe) is handle and (handle.settings.thresh, handle.settings.K) == (0.3, 3)
        assert handle.computed_steps is None
    finally:
        handle.remove()


def test_command_line(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("# tuning prompts\na red circle\n\na green square\n")
    S.main(["--tiny", "flux", "--prompts-file", str(tmp_path / "prompts.txt"), "--budget", "4", "--steps", "8",
            "--height", "32", "--width", "32", "--K", "2", "--call-json", '{"max_sequence_length": 16}', "--preset", "flux", "--json", str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["items"] == [["a red circle", 0], ["a green square", 0]] and out["stopped_by"] == "local optimum"
    assert json.dumps(out["computed_steps"]) in capsys.readouterr().out
    assert len(out["computed_steps"]["cond"]) == 4 and out["psnr"] >= out["uniform_psnr"]
