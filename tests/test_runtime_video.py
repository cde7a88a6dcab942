"""MagCache on the video pipelines: HunyuanVideo, Wan2.1 T2V / I2V, Wan VACE, FramePack (+F1).

Every test runs the real diffusers 0.42.1 pipeline code on tiny random-weight models (``magcache.studio.tiny``),
offline, on the CPU. Outputs are compared bit for bit where the claim is exactness.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import magcache
from magcache import policy as P
from magcache.__main__ import main as cli_main
from magcache.studio.tiny import build_tiny_pipeline, tiny_call_kwargs

STEPS = 8
# At 8 steps these settings give skips limited by the error threshold, by K and by retention, and different
# schedules for Wan's cond and uncond halves (see test_schedule_matches_prediction).
THRESH, K = 0.05, 3
FRAMEPACK_FRAMES = 25  # latent_window_size 3 -> 9 frames per section -> 3 sections

# Arguments that switch classifier-free guidance off / on for each pipeline class.
CFG_ARGS = {
    "hunyuan_video": ({}, {"true_cfg_scale": 3.0, "negative_prompt": "blurry"}),
    "framepack": ({}, {"true_cfg_scale": 3.0, "negative_prompt": "blurry"}),
    "wan_t2v": ({"guidance_scale": 1.0}, {"guidance_scale": 5.0}),
    "wan_i2v": ({"guidance_scale": 1.0}, {"guidance_scale": 5.0}),
    "wan_vace": ({"guidance_scale": 1.0}, {"guidance_scale": 5.0}),
}
DEFAULT_PRESET = {
    "hunyuan_video": "hunyuan_video",
    "framepack": "framepack",
    "wan_t2v": "wan2.1_t2v_1.3B",
    "wan_i2v": "wan2.1_i2v_480p_14B",
    "wan_vace": "wan2.1_vace_1.3B",
}


def run(pipe, kind: str, steps: int = STEPS, cfg: bool = False, seed: int = 0, **overrides):
    kw = tiny_call_kwargs(kind, steps, seed)
    kw.update(CFG_ARGS[kind][cfg])
    if kind == "framepack":
        kw["num_frames"] = FRAMEPACK_FRAMES
    kw.setdefault("output_type", "latent")
    kw.update(overrides)
    return pipe(**kw).frames


def tensors(out) -> list[torch.Tensor]:
    """FramePack's latent output is a list (one history tensor per section); the others one tensor."""
    return list(out) if isinstance(out, (list, tuple)) else [out]


def identical(a, b) -> bool:
    ta, tb = tensors(a), tensors(b)
    return len(ta) == len(tb) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb))


def max_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(tensors(a), tensors(b)))


def held_residuals(handle) -> dict[str, torch.Tensor]:
    run_state = handle._run
    if run_state is None:
        return {}
    return {name: b.residual for name, b in run_state.branches.items() if b.residual is not None}


def expected_sections(num_frames: int, latent_window_size: int = 3) -> int:
    window = (latent_window_size - 1) * 4 + 1
    return -(-num_frames // window)


class StackRecorder:
    """Per transformer call: the stack input (entry tokens), what ``norm_out`` finally receives (hooks registered
    after MagCache's, so they see its replacement), and how often the watched modules ran."""

    def __init__(self, transformer, entry: str, to_tokens, watch: dict[str, torch.nn.Module], keep_inputs=False):
        self.entries: list[torch.Tensor] = []
        self.exits: list[torch.Tensor] = []
        self.counts: list[dict[str, int]] = []
        self.inputs: list[tuple] = []
        self._hooks = []

        def on_call(module, args, kwargs):
            self.counts.append(dict.fromkeys(watch, 0))
            if keep_inputs:
                clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
                self.inputs.append((tuple(map(clone, args)), {k: clone(v) for k, v in kwargs.items()}))

        self._hooks.append(transformer.register_forward_pre_hook(on_call, with_kwargs=True))
        self._hooks.append(transformer.get_submodule(entry).register_forward_hook(
            lambda m, a, out: self.entries.append(to_tokens(out).clone())))
        self._hooks.append(transformer.norm_out.register_forward_pre_hook(lambda m, a: self.exits.append(a[0].clone())))
        for name, module in watch.items():
            self._hooks.append(module.register_forward_hook(lambda m, a, o, name=name: self._count(name)))

    def _count(self, name: str) -> None:
        self.counts[-1][name] += 1

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def wan_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def calls_in_order(run_stats, branches=("cond", "uncond")) -> list[tuple[int, str, P.Decision]]:
    """(step, branch, decision) in the order diffusers' pipelines call the transformer: per step cond, then uncond."""
    out = []
    for step in range(run_stats.num_steps):
        for b in branches:
            if b in run_stats.branches:
                out.append((step, b, run_stats.branches[b].decisions[step]))
    return out


# --------------------------------------------------------------------------------------------------
# Exactness at thresh 0, and actual schedules = the policy's prediction, per branch and per section
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [False, True], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("kind", ["hunyuan_video", "wan_t2v", "wan_i2v", "wan_vace", "framepack"])
def test_thresh0_bit_identical_and_schedule_matches_prediction(kind, cfg):
    pipe = build_tiny_pipeline(kind)
    plain = run(pipe, kind, cfg=cfg)
    num_branches = 2 if cfg else 1
    num_runs = expected_sections(FRAMEPACK_FRAMES) if kind == "framepack" else 1

    handle = magcache.apply(pipe, thresh=0)
    assert handle.preset.id == DEFAULT_PRESET[kind]
    off = run(pipe, kind, cfg=cfg)
    assert identical(off, plain), f"thresh 0 differs from the uncached pipeline by {max_diff(off, plain)}"
    assert len(handle.runs) == num_runs
    for r in handle.runs:
        assert r.completed and sorted(r.branches) == sorted(P.BRANCH_NAMES[:num_branches])
        assert all(len(v) == STEPS for v in r.computed.values())

    handle.configure(thresh=THRESH, K=K)
    handle.reset_stats()
    cached = run(pipe, kind, cfg=cfg)
    predicted = handle.predict(STEPS, num_branches)
    assert len(handle.runs) == num_runs  # FramePack: one run per section
    for r in handle.runs:
        assert r.completed
        assert r.computed == predicted.computed
        for b in predicted.decisions:  # same decisions, same accumulated errors, same reasons
            assert r.branches[b].decisions == predicted.decisions[b]
        assert r.branches["cond"].decisions[0].skip is False  # first step of every run / section computed
    assert all(predicted.skipped.values()), "settings chosen so that every branch skips something"
    assert not identical(cached, plain) and np.isfinite(max_diff(cached, plain))
    assert held_residuals(handle) == {}, "cached residuals must be freed when the run ends"
    handle.remove()


def test_wan_cfg_halves_of_the_interleaved_curve():
    """Wan's published curve interleaves cond (even) and uncond (odd); each branch must use its own half."""
    preset = magcache.get_preset("wan2.1_t2v_1.3B")
    assert len(preset.curves) == 2 and preset.curves[0] != preset.curves[1]
    sched = magcache.simulate(preset.curves, STEPS, preset.settings(thresh=THRESH, K=K), preset.rules, 2)
    assert [d.ratio for d in sched.decisions["cond"]] == P.nearest_interp(preset.curves[0], STEPS)
    assert [d.ratio for d in sched.decisions["uncond"]] == P.nearest_interp(preset.curves[1], STEPS)
    assert sched.computed["cond"] != sched.computed["uncond"]  # so a swapped or shared state would show


# --------------------------------------------------------------------------------------------------
# Branch state keyed by branch identity, not by call order or batching
# --------------------------------------------------------------------------------------------------
def _manual_cfg_loop(pipe, order, steps=STEPS, batched=False):
    """A Wan denoising loop written out, so the order of the cond/uncond calls (or batching them) can be chosen."""
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 2, 2, generator=g)
    text = {"cond": torch.randn(1, 8, 32, generator=g), "uncond": torch.randn(1, 8, 32, generator=g)}
    pipe.scheduler.set_timesteps(steps)
    preds: dict[str, list[torch.Tensor]] = {"cond": [], "uncond": []}
    for timestep in pipe.scheduler.timesteps:
        now = {}
        if batched:  # one call with batch [cond, uncond], no cache_context
            both = t(latents.repeat(2, 1, 1, 1, 1), timestep.expand(2), torch.cat([text["cond"], text["uncond"]]),
                     return_dict=False)[0]
            now = {"cond": both[:1], "uncond": both[1:]}
        else:
            for name in order:
                with t.cache_context(name):
                    now[name] = t(latents, timestep.expand(1), text[name], return_dict=False)[0]
        for name in now:
            preds[name].append(now[name])
        guided = now["uncond"] + 5.0 * (now["cond"] - now["uncond"])
        latents = pipe.scheduler.step(guided, timestep, latents, return_dict=False)[0]
    return preds


def test_wan_branch_state_follows_cache_context_not_call_order():
    pipe = build_tiny_pipeline("wan_t2v")
    handle = magcache.apply(pipe, thresh=THRESH, K=K)
    usual = _manual_cfg_loop(pipe, ("cond", "uncond"))
    usual_run = handle.last_run
    swapped = _manual_cfg_loop(pipe, ("uncond", "cond"))
    swapped_run = handle.last_run
    assert usual_run is not swapped_run and usual_run.completed and swapped_run.completed
    # Each branch behaves as if it ran alone with its own state: same decisions, same outputs, bit for bit.
    predicted = handle.predict(STEPS, 2)
    for b in ("cond", "uncond"):
        assert usual_run.branches[b].decisions == predicted.decisions[b]
        assert swapped_run.branches[b].decisions == predicted.decisions[b]
        assert all(torch.equal(x, y) for x, y in zip(usual[b], swapped[b])), b
    assert usual_run.computed["cond"] != usual_run.computed["uncond"]

    # Batched CFG (one call, batch [cond, uncond], no context) is one branch to MagCache: the cond curve and a
    # single-branch retention decide for the whole batch (documented in docs/video_models.md).
    _manual_cfg_loop(pipe, (), batched=True)
    batched_run = handle.last_run
    single = handle.predict(STEPS, 1)
    assert list(batched_run.branches) == ["cond"]
    assert batched_run.branches["cond"].decisions == single.decisions["cond"]
    handle.remove()


# --------------------------------------------------------------------------------------------------
# VACE: a skipped step is input + cached residual, with no VACE hints computed or added again
# --------------------------------------------------------------------------------------------------
def test_vace_skipped_step_is_input_plus_cached_residual_without_second_hints():
    pipe = build_tiny_pipeline("wan_vace")
    t = pipe.transformer
    handle = magcache.apply(pipe, thresh=THRESH, K=K)
    rec = StackRecorder(t, "patch_embedding", wan_tokens, {"vace": t.vace_blocks[0], "blocks": t.blocks[0]},
                        keep_inputs=True)
    run(pipe, "wan_vace", cfg=True)
    rec.remove()
    calls = calls_in_order(handle.last_run)
    assert len(calls) == len(rec.exits) == 2 * STEPS

    residual: dict[str, torch.Tensor] = {}
    skipped_calls = []
    for i, (step, branch, decision) in enumerate(calls):
        entry, exit_in, counts = rec.entries[i], rec.exits[i], rec.counts[i]
        if decision.skip:
            # exactly the patch-embedded input plus this branch's residual from its last computed step
            assert torch.equal(exit_in, (entry + residual[branch]).float()), (step, branch)
            assert counts == {"vace": 0, "blocks": 0}, (step, branch)
            skipped_calls.append(i)
        else:
            assert counts == {"vace": 1, "blocks": 1}, (step, branch)
            residual[branch] = exit_in.to(entry.dtype) - entry
    assert {calls[i][1] for i in skipped_calls} == {"cond", "uncond"}

    # A naive skip (diffusers' built-in hook) would run the VACE blocks and add this step's hints on top of a
    # residual that already contains the previous step's: replay a skipped call uncached to measure those hints.
    i = skipped_calls[0]
    args, kwargs = rec.inputs[i]
    hints = []
    scales = kwargs["control_hidden_states_scale"]
    hook_handles = [blk.register_forward_hook(lambda m, a, out: hints.append(out[0])) for blk in t.vace_blocks]
    handle.configure(enabled=False)
    with torch.no_grad():
        t(*args, **kwargs)
    for h in hook_handles:
        h.remove()
    assert len(hints) == len(t.vace_blocks)
    hint_sum = sum(h * s for h, s in zip(hints, scales))
    ours = rec.exits[i]
    naive = ours + hint_sum.float()
    assert (naive - ours).abs().max().item() > 1e-2 * ours.abs().max().item()
    handle.remove()


# --------------------------------------------------------------------------------------------------
# FramePack: state restarts per section, |1 - ratio| guard, real CFG as two branches
# --------------------------------------------------------------------------------------------------
def test_framepack_sections_restart_and_ratio_jump_guard_with_real_cfg():
    # A flat curve with one jump: without the guard, step 5 would be skipped (accumulated error 0.1 <= 0.5).
    curve = [1.0] * STEPS
    curve[5] = 1.1
    pipe = build_tiny_pipeline("framepack")
    handle = magcache.apply(pipe, thresh=0.5, K=3, curves=[curve])
    out = run(pipe, "framepack", cfg=True)
    sections = expected_sections(FRAMEPACK_FRAMES)
    assert len(tensors(out)) == sections >= 3 and len(handle.runs) == sections

    predicted = handle.predict(STEPS, 2)
    unguarded = magcache.simulate([curve], STEPS, handle.settings, dataclasses.replace(handle.rules, max_ratio_jump=None), 2)
    assert 5 in unguarded.skipped["cond"] and 5 in predicted.computed["cond"]
    for r in handle.runs:
        for b in ("cond", "uncond"):
            decisions = r.branches[b].decisions
            assert decisions == predicted.decisions[b]  # fresh state in every section
            assert decisions[0].skip is False and decisions[5].reason == "ratio jump"
    handle.remove()


def test_framepack_f1_preset_runs_vanilla_sampling():
    pipe = build_tiny_pipeline("framepack")
    handle = magcache.apply(pipe, preset="framepack_f1", thresh=THRESH, K=K)
    out = run(pipe, "framepack", sampling_type="vanilla")
    assert len(handle.runs) == expected_sections(FRAMEPACK_FRAMES)
    predicted = handle.predict(STEPS, 1)
    assert all(r.computed == predicted.computed for r in handle.runs)
    assert all(torch.isfinite(x).all() for x in tensors(out))
    handle.remove()


# --------------------------------------------------------------------------------------------------
# Memory: one residual per branch at most, over image tokens only, freed when the run (section) ends
# --------------------------------------------------------------------------------------------------
def _image_tokens(kind: str, transformer, hidden_states: torch.Tensor) -> int:
    """Image tokens of the noisy input the head predicts (text and FramePack history excluded)."""
    c = transformer.config
    _, _, f, h, w = hidden_states.shape
    if kind.startswith("wan"):
        pt, ph, pw = c.patch_size
    else:
        pt, ph, pw = c.patch_size_t, c.patch_size, c.patch_size
    return (f // pt) * (h // ph) * (w // pw)


@pytest.mark.parametrize("kind", ["hunyuan_video", "wan_t2v", "framepack"])
def test_at_most_one_residual_per_branch_over_image_tokens_freed_at_run_end(kind):
    pipe = build_tiny_pipeline(kind)
    t = pipe.transformer
    handle = magcache.apply(pipe, thresh=THRESH, K=K)
    inner = t.config.num_attention_heads * t.config.attention_head_dim
    seen: list[weakref.ref] = []
    log = []  # per call: (live residual tensors, branches so far, run completed)
    inputs = []

    def before(module, args, kwargs):
        inputs.append(kwargs.get("hidden_states", args[0] if args else None))

    def after(module, args, out):
        held = held_residuals(handle)
        for r in held.values():
            if not any(ref() is r for ref in seen):
                seen.append(weakref.ref(r))
            assert r.shape == (1, _image_tokens(kind, t, inputs[-1]), inner)
        live = sum(ref() is not None for ref in seen)
        log.append((live, len(handle._run.branches) if handle._run else 0, handle.runs[-1].completed))
        assert handle._call is None  # the stack input of the call is not kept either

    hooks = [t.register_forward_pre_hook(before, with_kwargs=True), t.register_forward_hook(after)]
    run(pipe, kind, cfg=True)
    for h in hooks:
        h.remove()
    assert len(seen) >= 2 * len(handle.runs)  # residuals were refreshed during the run(s)
    assert all(live <= branches for live, branches, _ in log)
    assert all(live == 0 for live, _, completed in log if completed), "freed when each run/section ends"
    gc.collect()
    assert all(ref() is None for ref in seen)
    handle.remove()


# --------------------------------------------------------------------------------------------------
# Runs after an exception equal fresh runs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["wan_t2v", "framepack"])
def test_run_after_exception_equals_fresh_run(kind):
    pipe = build_tiny_pipeline(kind)
    t = pipe.transformer
    handle = magcache.apply(pipe, thresh=THRESH, K=K)
    fresh = run(pipe, kind, cfg=True)
    fresh_stats = [r.summary() for r in handle.runs]
    first_block = (t.blocks if kind.startswith("wan") else t.transformer_blocks)[0]

    # 1) inside the transformer, mid-run (for FramePack: in the second section)
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("injected failure")

    hook = first_block.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="injected"):
        run(pipe, kind, cfg=True)
    hook.remove()
    assert handle.runs[-1].completed is False and held_residuals(handle) == {}
    handle.reset_stats()
    again = run(pipe, kind, cfg=True)
    assert identical(again, fresh)
    assert [r.summary() for r in handle.runs] == fresh_stats

    # 2) outside the transformer (a step callback), with residuals held at that moment
    if kind.startswith("wan"):
        def stop(pipe_, i, timestep, kw):
            if i == 3:
                assert held_residuals(handle), "a residual is held mid-run"
                raise KeyboardInterrupt
            return kw

        with pytest.raises(KeyboardInterrupt):
            run(pipe, kind, cfg=True, callback_on_step_end=stop)
        handle.reset_stats()
        assert identical(run(pipe, kind, cfg=True), fresh)
        assert [r.summary() for r in handle.runs] == fresh_stats
    handle.remove()


# --------------------------------------------------------------------------------------------------
# bf16: Wan's norm_out gets hidden_states.float(); residual kept in the stack's dtype
# --------------------------------------------------------------------------------------------------
def test_wan_bf16_run_skips_exactly_and_reconstructs_sensibly():
    pipe = build_tiny_pipeline("wan_t2v").to(torch.bfloat16)
    t = pipe.transformer
    plain = run(pipe, "wan_t2v", cfg=True)
    handle = magcache.apply(pipe, thresh=0)
    assert identical(run(pipe, "wan_t2v", cfg=True), plain)
    handle.configure(thresh=THRESH, K=K)
    rec = StackRecorder(t, "patch_embedding", wan_tokens, {})
    out = run(pipe, "wan_t2v", cfg=True)
    rec.remove()
    assert t.dtype == torch.bfloat16 and torch.isfinite(out).all()  # the pipeline keeps its latents in float32
    assert handle.last_run.computed == handle.predict(STEPS, 2).computed
    residual = {}
    for i, (step, branch, decision) in enumerate(calls_in_order(handle.last_run)):
        entry, exit_in = rec.entries[i], rec.exits[i]
        assert entry.dtype == torch.bfloat16 and exit_in.dtype == torch.float32
        if decision.skip:
            assert torch.equal(exit_in, (entry + residual[branch]).float())
        else:
            residual[branch] = exit_in.to(entry.dtype) - entry
            assert residual[branch].dtype == torch.bfloat16
            # what a skip would hand over if the residual were reused unchanged: bf16 rounding only
            rebuilt = (entry + residual[branch]).float()
            assert (rebuilt - exit_in).abs().max().item() <= 2**-7 * exit_in.abs().max().item()
    handle.remove()


# --------------------------------------------------------------------------------------------------
# Image / control inputs still reach the model with the cache on
# --------------------------------------------------------------------------------------------------
def _picture(seed: int, size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("kind", ["wan_i2v", "framepack"])
def test_image_input_works_with_cache_on(kind):
    pipe = build_tiny_pipeline(kind)
    handle = magcache.apply(pipe, thresh=THRESH, K=K)
    a = run(pipe, kind, image=_picture(1, 32))
    b = run(pipe, kind, image=_picture(2, 32))
    assert all(handle.runs[-1].skipped.values())
    assert [x.shape for x in tensors(a)] == [x.shape for x in tensors(b)]
    if kind == "wan_i2v":
        assert a.shape == (1, 16, 3, 2, 2)
    else:
        assert len(tensors(a)) == expected_sections(FRAMEPACK_FRAMES)
    assert not identical(a, b), "the input image must still change the result"
    handle.remove()


def test_vace_video_mask_reference_inputs_work_with_cache_on():
    pipe = build_tiny_pipeline("wan_vace")
    handle = magcache.apply(pipe, thresh=THRESH, K=K)
    video = [_picture(10 + i, 16) for i in range(9)]
    mask_a = [Image.fromarray(np.full((16, 16), 255 if i % 2 else 0, np.uint8)) for i in range(9)]
    mask_b = [Image.fromarray(np.full((16, 16), 0 if i % 2 else 255, np.uint8)) for i in range(9)]
    common = dict(video=video, reference_images=[_picture(3, 16)], output_type="pt")
    a = run(pipe, "wan_vace", mask=mask_a, **common)
    assert a.shape == (1, 9, 3, 16, 16) and torch.isfinite(a).all()  # reference frames removed again
    assert all(handle.runs[-1].skipped.values())
    b = run(pipe, "wan_vace", mask=mask_b, **common)
    assert b.shape == a.shape and not torch.equal(a, b), "the mask must still change the result"
    handle.remove()


# --------------------------------------------------------------------------------------------------
# Default presets and the CLI at the reference defaults (the published schedules)
# --------------------------------------------------------------------------------------------------
REFERENCE_COUNTS = {  # preset: (steps, computed per branch); framepack_f1 has no published count
    "hunyuan_video": (50, {"cond": 19}),
    "wan2.1_t2v_1.3B": (50, {"cond": 21, "uncond": 21}),
    "wan2.1_t2v_14B": (50, {"cond": 18, "uncond": 18}),
    "wan2.1_i2v_480p_14B": (40, {"cond": 15, "uncond": 15}),
    "wan2.1_i2v_720p_14B": (40, {"cond": 14, "uncond": 14}),
    "wan2.1_vace_1.3B": (50, {"cond": 29, "uncond": 29}),
    "framepack": (25, {"cond": 12}),
    "framepack_f1": (25, None),
}


@pytest.mark.parametrize("preset_id", list(REFERENCE_COUNTS))
def test_cli_schedule_per_branch_at_reference_defaults(preset_id, capsys):
    assert cli_main(["schedule", "--preset", preset_id, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    preset = magcache.get_preset(preset_id)
    steps, counts = REFERENCE_COUNTS[preset_id]
    sched = magcache.simulate(preset.curves, preset.calibrated_steps, preset.settings(), preset.rules, len(preset.curves))
    assert out["steps"] == steps and out["computed"] == sched.computed
    assert set(out["computed"]) == ({"cond", "uncond"} if preset.interleaved else {"cond"})
    if counts is not None:
        assert out["computed_per_branch"] == counts


def test_cli_subprocess_cfg_output():
    cmd = [sys.executable, "-m", "magcache", "schedule", "--json", "--preset"]
    wan = json.loads(subprocess.run(cmd + ["wan2.1_i2v_720p_14B"], capture_output=True, text=True, check=True).stdout)
    assert wan["computed_per_branch"] == {"cond": 14, "uncond": 14}
    hv = json.loads(subprocess.run(cmd + ["hunyuan_video", "--cfg"], capture_output=True, text=True, check=True).stdout)
    assert hv["computed_per_branch"] == {"cond": 19, "uncond": 19}  # true CFG: uncond reuses the cond curve


def test_wan_default_presets_from_checkpoint_name_and_width():
    from magcache.adapters import wan

    class Cfg(dict):
        __getattr__ = dict.get

    class Model:
        def __init__(self, **cfg):
            self.config = Cfg(cfg)

    t2v = dict(in_channels=16, num_attention_heads=12, attention_head_dim=128)
    assert wan._wan_preset(None, Model(**t2v)) == "wan2.1_t2v_1.3B"
    assert wan._wan_preset(None, Model(**{**t2v, "num_attention_heads": 40})) == "wan2.1_t2v_14B"
    i2v = dict(in_channels=36, num_attention_heads=40, attention_head_dim=128)
    assert wan._wan_preset(None, Model(**i2v)) == "wan2.1_i2v_480p_14B"
    assert wan._wan_preset(None, Model(**i2v, _name_or_path="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers")) == "wan2.1_i2v_720p_14B"
    with pytest.raises(ValueError, match="width 3072"):  # Wan2.2 TI2V-5B has no Wan2.1 curve
        wan._wan_preset(None, Model(in_channels=16, num_attention_heads=24, attention_head_dim=128))
    with pytest.raises(ValueError, match="two-expert"):
        pipe = type("Pipe", (), {"transformer_2": object()})()
        wan._wan_preset(pipe, Model(**{**t2v, "num_attention_heads": 40}))
    assert wan._vace_preset(None, Model(**t2v)) == "wan2.1_vace_1.3B"
