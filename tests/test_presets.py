"""Shipped ratio curves, preset ids, reference defaults and rule sets."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from magcache import presets as PR
from magcache.policy import Settings
from magcache.presets import get_preset, list_presets

# the first models, keyed as in magcache/data/mag_ratios.json (flux_kontext = the diffusers curve)
SEED_PRESETS = {
    "flux": ("flux", "flux"),
    "flux_kontext": ("flux_kontext_diffusers", "flux"),
    "chroma": ("chroma", "chroma"),
    "hunyuan_video": ("hunyuan_video", "hunyuan_video"),
    "wan2.1_t2v_1.3B": ("wan2.1_t2v_1.3B", "wan"),
    "wan2.1_t2v_14B": ("wan2.1_t2v_14B", "wan"),
    "wan2.1_i2v_480p_14B": ("wan2.1_i2v_480p_14B", "wan"),
    "wan2.1_i2v_720p_14B": ("wan2.1_i2v_720p_14B", "wan"),
    "wan2.1_vace_1.3B": ("wan2.1_vace_1.3B", "wan_vace"),
    "framepack": ("framepack", "framepack"),
    "framepack_f1": ("framepack_f1", "framepack"),
}


def _shipped() -> dict:
    return json.loads(resources.files("magcache.data").joinpath("mag_ratios.json").read_text(encoding="utf-8"))


def _split(entry) -> list[list[float]]:
    r = entry["mag_ratios"]
    return [r[0::2], r[1::2]] if entry.get("cfg_interleaved") else [r]


@pytest.mark.parametrize("preset_id", sorted(SEED_PRESETS))
def test_seed_presets_carry_the_published_curve_defaults_and_source(preset_id):
    key, family = SEED_PRESETS[preset_id]
    entry = _shipped()[key]
    p = get_preset(preset_id)
    assert p.family == family
    assert [list(c) for c in p.curves] == _split(entry)
    assert p.calibrated_steps == entry["num_steps"] == len(p.curves[0])
    d = entry["defaults"]
    assert (p.thresh, p.retention_ratio, p.K) == (d["magcache_thresh"], d["retention_ratio"], d["magcache_K"])
    assert p.source == entry["source"] and p.source
    assert p.rules_source


def test_every_published_inference_curve_is_a_preset():
    shipped = _shipped()
    curve_keys = {k for k in shipped if k != "_meta" and not k.endswith("_paper_eval")}
    used = {PR._CATALOG[pid][0] for pid in list_presets() if pid in PR._CATALOG}
    assert curve_keys <= used, curve_keys - used
    # the paper-eval arrays ship as data only: they were used with sqrt and index offsets
    assert {"wan2.1_t2v_1.3B_paper_eval", "open_sora_1.2_paper_eval"} <= set(shipped)


def test_shipped_curves_are_well_formed():
    for key, entry in _shipped().items():
        if key == "_meta" or key.endswith("_paper_eval"):
            continue
        n = entry["num_steps"]
        ratios = entry["mag_ratios"]
        assert len(ratios) == (2 * n if entry.get("cfg_interleaved") else n), key
        padding = ratios[:2] if entry.get("cfg_interleaved") else ratios[:1]
        assert all(v == 1.0 for v in padding), key  # the leading 1.0 padding of the reference arrays
        assert all(0.5 < v < 2.0 for v in ratios), key
        assert entry["source"] and set(entry["defaults"]) == {"magcache_thresh", "retention_ratio", "magcache_K"}


def test_cfg_presets_have_two_branch_curves():
    for pid in ("chroma", "wan2.1_t2v_1.3B", "wan2.1_vace_1.3B", "wan2.1_i2v_720p_14B"):
        p = get_preset(pid)
        assert p.interleaved and len(p.curves) == 2 and len(p.curves[0]) == len(p.curves[1]) == p.calibrated_steps
    for pid in ("flux", "flux_kontext", "hunyuan_video", "framepack"):
        assert len(get_preset(pid).curves) == 1


def test_unknown_preset_error_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown MagCache preset 'nope'.*flux_kontext"):
        get_preset("nope")


def test_list_presets_with_adapter_only():
    with_adapter = set(list_presets(with_adapter_only=True))
    assert set(SEED_PRESETS) <= with_adapter
    assert "qwen_image" in list_presets() and "qwen_image" not in with_adapter  # curve shipped, no adapter yet


def test_settings_take_reference_defaults_and_overrides():
    p = get_preset("flux")
    assert p.settings() == Settings(0.24, 0.1, 5)
    s = p.settings(thresh=0.1, retention_ratio=None, K=None, protect_last_steps=1)
    assert (s.thresh, s.retention_ratio, s.K, s.protect_last_steps) == (0.1, 0.1, 5, 1)
    assert p.settings(thresh=0).thresh == 0  # 0 is a value, not "omitted"
    with pytest.raises(ValueError, match="K must be"):
        p.settings(K=1.5)


def test_summary_is_json_ready():
    s = get_preset("chroma").summary()
    assert json.loads(json.dumps(s))["defaults"] == {"thresh": 0.1, "retention_ratio": 0.25, "K": 2}
    assert s["cfg_branches"] == 2 and s["calibrated_steps"] == 26


def test_extra_calibration_files_use_the_same_entry_format():
    entry = {"model": "tiny", "source": "our calibration", "num_steps": 4, "cfg_interleaved": True,
             "mag_ratios": [1.0, 1.0, 1.1, 1.2, 1.05, 1.06, 0.9, 0.95],
             "defaults": {"magcache_thresh": 0.1, "retention_ratio": 0.2, "magcache_K": 2}}
    p = PR._preset_from_entry("mine", entry, "flux", PR.CALIBRATED_FLUX, "ours")
    assert p.curves == ((1.0, 1.1, 1.05, 0.9), (1.0, 1.2, 1.06, 0.95))
    assert (p.calibrated_steps, p.thresh, p.K, p.family) == (4, 0.1, 2, "flux")
    assert not p.rules.guarded_steps  # FLUX.1-dev's step-11 guard does not carry over to other curves
