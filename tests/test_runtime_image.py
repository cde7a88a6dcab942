"""The runtime on tiny offline image pipelines: FLUX (with / without true CFG), FLUX-Kontext (with / without true CFG),
Chroma (guidance 1 and > 1).

Every check compares against something the runtime does not compute itself: a pipeline never touched by magcache,
a freshly built pipeline, the blocks that actually ran (counted with our own hooks), or the tensors entering
``norm_out`` (recorded with our own hooks).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import magcache
from magcache import runtime as R
from magcache.policy import simulate
from magcache.presets import get_preset
from magcache.studio.tiny import build_tiny_pipeline, tiny_call_kwargs

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
TRUE_CFG = dict(true_cfg_scale=2.0, negative_prompt="blurry, low quality")
CASES = {
    "flux": ("flux", {}),
    "flux_true_cfg": ("flux", TRUE_CFG),
    "kontext": ("flux_kontext", {}),
    "kontext_true_cfg": ("flux_kontext", TRUE_CFG),
    "chroma_cfg1": ("chroma", dict(guidance_scale=1.0)),
    "chroma_cfg4": ("chroma", dict(guidance_scale=4.0)),
}
TWO_BRANCHES = {"flux_true_cfg", "kontext_true_cfg", "chroma_cfg4"}
SKIPPY = dict(thresh=1.0, retention_ratio=0.2, K=2)  # skips plenty on 8 steps with every preset curve


# 16x16 latents and 16 text tokens keep attention small: a run takes a fraction of a second on one core
SMALL = dict(prompt="a red circle", height=16, width=16, max_sequence_length=16, output_type="latent")


def _kwargs(case: str, steps: int = STEPS, **extra) -> dict:
    kind, case_extra = CASES[case]
    kw = tiny_call_kwargs(kind, steps)
    kw.update(SMALL, **case_extra)
    if kind == "flux_kontext":
        kw["max_area"] = 16 * 16
    kw.update(extra)
    return kw


def _run(pipe, case: str, steps: int = STEPS, **extra) -> torch.Tensor:
    return pipe(**_kwargs(case, steps, **extra)).images


def _pipe(case: str):
    return build_tiny_pipeline(CASES[case][0])


def _fresh_output(case: str, steps: int = STEPS, **settings) -> tuple[torch.Tensor, magcache.MagCacheHandle]:
    pipe = _pipe(case)
    handle = magcache.apply(pipe, **settings)
    return _run(pipe, case, steps), handle


def _branches(case: str) -> int:
    return 2 if case in TWO_BRANCHES else 1


def _no_residuals(handle) -> bool:
    return handle._run is None or all(b.residual is None for b in handle._run.branches.values())


class CallRecorder:
    """Our own hooks: per transformer call, the ``x_embedder`` output, the ``norm_out`` input (after magcache's
    pre-hook, which runs first) and how many blocks ran."""

    def __init__(self, transformer):
        self.entries, self.exits, self.blocks_ran, self.block_counts = [], [], [], []
        self.num_blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
        self._block_calls = 0
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        self._handles = [
            transformer.x_embedder.register_forward_hook(lambda m, a, out: self.entries.append(out.detach().clone())),
            *[b.register_forward_pre_hook(self._on_block) for b in blocks],
            transformer.norm_out.register_forward_pre_hook(self._on_norm_out),
        ]

    def _on_block(self, module, args):
        self._block_calls += 1

    def _on_norm_out(self, module, args):
        self.exits.append(args[0].detach().clone())
        self.blocks_ran.append(self._block_calls > 0)
        self.block_counts.append(self._block_calls)
        self._block_calls = 0

    def remove(self):
        for h in self._handles:
            h.remove()


# --------------------------------------------------------------------------------------------------
# Cache off == plain pipeline, bit for bit
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_cache_off_equals_the_plain_pipeline(case):
    plain = _run(_pipe(case), case)  # never touched by magcache
    pipe = _pipe(case)
    handle = magcache.apply(pipe, thresh=0.0)
    assert torch.equal(_run(pipe, case), plain)
    assert handle.last_run.computed == {b: list(range(STEPS)) for b in handle.last_run.branches}
    handle.configure(enabled=False, **SKIPPY)
    assert torch.equal(_run(pipe, case), plain)
    handle.configure(enabled=True)
    assert not torch.equal(_run(pipe, case), plain)  # skipping really changes the output
    assert sum(len(v) for v in handle.last_run.skipped.values()) > 0


# --------------------------------------------------------------------------------------------------
# Real schedule == policy prediction; skipped steps use input + the branch's own residual
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_skipping_follows_the_prediction_and_reuses_each_branchs_own_residual(case):
    pipe = _pipe(case)
    handle = magcache.apply(pipe, **SKIPPY)
    recorder = CallRecorder(pipe.transformer)
    _run(pipe, case)
    recorder.remove()
    nb = _branches(case)
    branch_names = ["cond", "uncond"][:nb]
    p = handle.preset
    predicted = simulate(p.curves, STEPS, p.settings(**SKIPPY), p.rules, nb).computed
    assert handle.predict(STEPS, nb).computed == predicted
    assert handle.last_run.computed == predicted
    # ground truth from our hooks: call c is step c // nb of branch c % nb (cond, then uncond)
    assert len(recorder.blocks_ran) == STEPS * nb
    assert set(recorder.block_counts) == {0, recorder.num_blocks}  # a call runs the whole stack or none of it
    actual = {b: [c // nb for c in range(STEPS * nb) if c % nb == i and recorder.blocks_ran[c]]
              for i, b in enumerate(branch_names)}
    assert actual == predicted
    assert all(len(predicted[b]) < STEPS for b in branch_names)
    # skipped calls: norm_out input == x_embedder output + that branch's last computed residual, exactly
    residual = {}
    checked = 0
    for c, ran in enumerate(recorder.blocks_ran):
        b = branch_names[c % nb]
        entry, exit_ = recorder.entries[c], recorder.exits[c]
        if ran:
            residual[b] = exit_ - entry
        else:
            assert torch.equal(exit_, entry + residual[b]), (c, b)
            other = [o for o in residual if o != b]
            for o in other:
                assert not torch.equal(exit_, entry + residual[o])
            checked += 1
    assert checked == sum(len(v) for v in handle.last_run.skipped.values()) > 0
    if nb == 2:
        assert not torch.equal(residual["cond"], residual["uncond"])
    assert _no_residuals(handle)  # freed at the end of the run


@pytest.mark.parametrize("case, steps, expected", [
    ("flux", 28, [0, 1, 2, 5, 9, 11, 17, 23, 26]),  # the published schedule, step 11 guarded
    ("kontext_true_cfg", 28, 14),
    ("chroma_cfg4", 26, [0, 1, 2, 3, 4, 5, 7, 10, 13, 16, 19, 22, 24]),
])
def test_reference_defaults_at_the_calibrated_step_count(case, steps, expected):
    pipe = _pipe(case)
    handle = magcache.apply(pipe)  # preset picked from the pipeline, reference defaults
    _run(pipe, case, steps)
    computed = handle.last_run.computed
    assert set(computed) == {"cond", "uncond"}.intersection(["cond", "uncond"][:_branches(case)])
    for steps_of_branch in computed.values():
        assert (len(steps_of_branch) == expected) if isinstance(expected, int) else (steps_of_branch == expected)
    assert handle.last_run.completed


# --------------------------------------------------------------------------------------------------
# State: per run, reset after exceptions and interrupts, independent across pipelines
# --------------------------------------------------------------------------------------------------
class _Boom(RuntimeError):
    pass


def _raise_at(step):
    def callback(pipe, i, t, callback_kwargs):
        if i == step:
            raise _Boom(f"stop at {i}")
        return {}

    return callback


@pytest.mark.parametrize("case", list(CASES))
def test_runs_after_a_settings_change_and_after_an_exception_equal_fresh_runs(case):
    second = dict(thresh=0.6, retention_ratio=0.3, K=1)
    pipe = _pipe(case)
    handle = magcache.apply(pipe, **SKIPPY)
    first = _run(pipe, case)
    first_stats = handle.last_run
    with pytest.raises(_Boom):
        # stop right after the first skipped step, where the accumulators are mid-way
        _run(pipe, case, callback_on_step_end=_raise_at(first_stats.skipped["cond"][0]))
    assert _no_residuals(handle)  # the exception left no cached residual behind
    assert torch.equal(_run(pipe, case), first)  # same settings, no configure(): a fresh run again
    assert handle.last_run.computed == first_stats.computed
    assert [d.acc_err for d in handle.last_run.branches["cond"].decisions] == \
           [d.acc_err for d in first_stats.branches["cond"].decisions]
    handle.configure(**second)
    out = _run(pipe, case)
    fresh, fresh_handle = _fresh_output(case, **second)
    assert torch.equal(out, fresh)
    assert handle.last_run.computed == fresh_handle.last_run.computed
    assert [d.acc_err for b in handle.last_run.branches.values() for d in b.decisions] == \
           [d.acc_err for b in fresh_handle.last_run.branches.values() for d in b.decisions]


def test_exception_inside_the_transformer_resets_the_run():
    case = "flux_true_cfg"
    pipe = _pipe(case)
    handle = magcache.apply(pipe, **SKIPPY)
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == 9:  # step 4, cond call
            raise _Boom("inside the transformer")

    hook = pipe.transformer.proj_out.register_forward_pre_hook(boom)
    with pytest.raises(_Boom):
        _run(pipe, case)
    hook.remove()
    assert handle._run is None and handle._call is None
    assert not handle.last_run.completed and len(handle.last_run.branches["cond"].decisions) == 5
    fresh, _ = _fresh_output(case, **SKIPPY)
    assert torch.equal(_run(pipe, case), fresh)


def test_interrupt_then_a_normal_run_equals_a_fresh_run():
    case = "chroma_cfg4"
    pipe = _pipe(case)
    handle = magcache.apply(pipe, **SKIPPY)

    def stop_at_3(p, i, t, callback_kwargs):
        if i == 3:
            p._interrupt = True
        return {}

    _run(pipe, case, callback_on_step_end=stop_at_3)
    interrupted = handle.last_run
    assert not interrupted.completed and [d.step for d in interrupted.branches["cond"].decisions] == [0, 1, 2, 3]
    assert _no_residuals(handle)
    fresh, _ = _fresh_output(case, **SKIPPY)
    assert torch.equal(_run(pipe, case), fresh)
    assert handle.last_run.completed and len(handle.runs) == 2


def test_step_counter_follows_num_inference_steps():
    case = "flux_true_cfg"
    pipe = _pipe(case)
    handle = magcache.apply(pipe, **SKIPPY)
    for steps in (5, 11, 7):
        out = _run(pipe, case, steps)
        assert handle.last_run.num_steps == steps
        assert handle.last_run.computed == handle.predict(steps, 2).computed
    fresh, _ = _fresh_output(case, 7, **SKIPPY)
    assert torch.equal(out, fresh)


def test_step_counter_follows_img2img_strength():
    from diffusers import FluxImg2ImgPipeline

    base = _pipe("flux")
    pipe = FluxImg2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    handle = magcache.apply(pipe, **SKIPPY)
    kw = tiny_call_kwargs("flux", 10)
    kw.update(SMALL, image=tiny_call_kwargs("flux_kontext", 10)["image"], strength=0.6)
    recorder = CallRecorder(pipe.transformer)
    pipe(**kw)
    recorder.remove()
    assert len(recorder.blocks_ran) == 6  # int(10 * 0.6) steps really run
    assert handle.last_run.num_steps == 6 and handle.last_run.completed
    assert handle.last_run.computed == handle.predict(6).computed
    assert [i for i, ran in enumerate(recorder.blocks_ran) if ran] == handle.last_run.computed["cond"]


def test_two_pipelines_with_caches_are_independent():
    a_settings, b_settings = SKIPPY, dict(thresh=0.5, retention_ratio=0.4, K=1)
    pa, pb = _pipe("flux_true_cfg"), _pipe("chroma_cfg4")
    class_attrs = {cls: set(vars(cls)) for cls in (type(pa.transformer), type(pb.transformer), type(pa), type(pb))}
    module_attrs = set(vars(R))
    ha, hb = magcache.apply(pa, **a_settings), magcache.apply(pb, **b_settings)
    out_a1 = _run(pa, "flux_true_cfg")
    out_b1 = _run(pb, "chroma_cfg4")
    out_a2 = _run(pa, "flux_true_cfg")
    assert torch.equal(out_a1, out_a2)
    assert torch.equal(out_a1, _fresh_output("flux_true_cfg", **a_settings)[0])
    assert torch.equal(out_b1, _fresh_output("chroma_cfg4", **b_settings)[0])
    assert len(ha.runs) == 2 and len(hb.runs) == 1 and ha.settings != hb.settings
    # nothing was stored on classes or module globals
    assert class_attrs == {cls: set(vars(cls)) for cls in class_attrs}
    assert module_attrs == set(vars(R))


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------
def test_calibration_computes_every_step_and_returns_usable_curves():
    case = "flux_true_cfg"
    pipe = _pipe(case)
    handle = magcache.apply(pipe, calibrate=True)
    recorder = CallRecorder(pipe.transformer)
    plain = _run(_pipe(case), case)
    assert torch.equal(_run(pipe, case), plain)  # calibration changes nothing in the output
    recorder.remove()
    assert all(recorder.blocks_ran)
    cal = handle.calibration()
    assert cal["num_steps"] == STEPS and set(cal["branches"]) == {"cond", "uncond"}
    for name, curves in cal["branches"].items():
        for key in ("mag_ratios", "mag_std", "cos_dis"):
            assert len(curves[key]) == STEPS
        assert curves["mag_ratios"][0] == 1.0 and all(v > 0 for v in curves["mag_ratios"])
    # recompute the reference statistic from our own recording: mean over tokens of ||r_t|| / ||r_{t-1}||
    residuals = [x - e for x, e in zip(recorder.exits[0::2], recorder.entries[0::2])]  # cond calls
    for t in range(1, STEPS):
        ratio = (residuals[t].norm(dim=-1) / residuals[t - 1].norm(dim=-1)).mean().item()
        cos = (1 - torch.nn.functional.cosine_similarity(residuals[t], residuals[t - 1], dim=-1)).mean().item()
        assert cal["branches"]["cond"]["mag_ratios"][t] == pytest.approx(ratio, abs=1e-5)
        assert cal["branches"]["cond"]["cos_dis"][t] == pytest.approx(cos, abs=1e-5)
    assert cal["branches"]["cond"]["mag_ratios"] != cal["branches"]["uncond"]["mag_ratios"]
    # the curves plug straight into a new apply
    curves = [cal["branches"]["cond"]["mag_ratios"], cal["branches"]["uncond"]["mag_ratios"]]
    handle2 = magcache.apply(pipe, curves=curves, thresh=0.3, retention_ratio=0.2, K=2)
    _run(pipe, case)
    expected = simulate(curves, STEPS, handle2.settings, handle2.rules, 2).computed
    assert handle2.last_run.computed == expected


# --------------------------------------------------------------------------------------------------
# apply / remove / presets
# --------------------------------------------------------------------------------------------------
def _hook_counts(t):
    return (len(t.x_embedder._forward_hooks), len(t.norm_out._forward_pre_hooks))


def test_remove_restores_the_transformer_and_pipeline_exactly():
    case = "kontext_true_cfg"
    pipe = _pipe(case)
    t = pipe.transformer
    plain = _run(pipe, case)  # a plain run first: the pipeline and diffusers set their own per-call attributes
    t_attrs, pipe_attrs, hooks = dict(vars(t)), dict(vars(pipe)), _hook_counts(t)
    handle = magcache.apply(pipe, **SKIPPY)
    _run(pipe, case)
    handle.remove()
    assert vars(t).keys() == t_attrs.keys() and all(vars(t)[k] is v for k, v in t_attrs.items())
    assert vars(pipe).keys() == pipe_attrs.keys()
    assert "progress_bar" not in vars(pipe) and "forward" not in vars(t)
    assert _hook_counts(t) == hooks and magcache.get_handle(pipe) is None
    assert torch.equal(_run(pipe, case), plain)
    magcache.remove(pipe)  # idempotent


def test_applying_twice_replaces_the_first_handle():
    case = "flux"
    pipe = _pipe(case)
    first = magcache.apply(pipe, **SKIPPY)
    second = magcache.apply(pipe, thresh=0.5, retention_ratio=0.4, K=1)
    assert magcache.get_handle(pipe) is second and not first._attached
    assert _hook_counts(pipe.transformer) == (1, 1)
    out = _run(pipe, case)
    assert first.runs == [] and len(second.runs) == 1
    assert torch.equal(out, _fresh_output(case, thresh=0.5, retention_ratio=0.4, K=1)[0])


def test_default_presets_and_family_check():
    assert magcache.apply(_pipe("flux")).preset.id == "flux"
    assert magcache.apply(_pipe("kontext")).preset.id == "flux_kontext"
    assert magcache.apply(_pipe("chroma_cfg1")).preset.id == "chroma"
    with pytest.raises(ValueError, match="is for chroma models"):
        magcache.apply(_pipe("flux"), preset="chroma")
    with pytest.raises(ValueError, match="K must be"):
        magcache.apply(_pipe("flux"), K=-1)
    assert magcache.apply(_pipe("flux"), preset="flux_kontext").preset.rules == get_preset("flux_kontext").rules


def test_bare_transformer_with_a_step_count():
    pipe = _pipe("flux")
    handle = magcache.apply(pipe.transformer, num_inference_steps=STEPS, **SKIPPY)
    recorder = CallRecorder(pipe.transformer)
    # the pipeline drives the transformer; the counter clock counts its calls
    _run(pipe, "flux")
    recorder.remove()
    assert handle.last_run.computed == handle.predict(STEPS).computed
    assert [i for i, ran in enumerate(recorder.blocks_ran) if ran] == handle.last_run.computed["cond"]
    with pytest.raises(ValueError, match="num_inference_steps"):
        magcache.apply(pipe.transformer)


# --------------------------------------------------------------------------------------------------
# No Gradio in the library
# --------------------------------------------------------------------------------------------------
def test_the_library_imports_no_gradio():
    for path in (ROOT / "magcache").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "gradio" for n in names), path
    code = ("import sys, magcache, magcache.runtime, magcache.adapters, magcache.metrics, magcache.studio.tiny\n"
            "magcache.adapters.adapter_by_family('flux')\n"
            "assert 'gradio' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_recalibration_on_the_same_handle_does_not_average_old_runs(tiny):
    import magcache
    from magcache.studio.tiny import tiny_call_kwargs

    pipe = tiny("flux")
    handle = magcache.apply(pipe, calibrate=True)
    pipe(**tiny_call_kwargs("flux", num_inference_steps=6, seed=1))
    first = handle.calibration()
    handle.configure(calibrate=True)
    pipe(**tiny_call_kwargs("flux", num_inference_steps=6, seed=2))
    second = handle.calibration()
    assert second["runs"] == 1
    assert second["branches"]["cond"]["mag_ratios"] != first["branches"]["cond"]["mag_ratios"]
