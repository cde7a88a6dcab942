"""The app's model manager: plans, lazy loading (local folder, single file, tiny), LRU within a budget,
placement, the fair device queue, cancellation and the missing-weights messages. Offline, CPU."""

import threading
import time

import pytest
import torch

from magcache.presets import get_preset
from magcache.adapters import adapter_by_family
from magcache.studio.catalog import load_catalog
from magcache.studio.manager import (GB, Cancelled, FairDeviceLock, LoadedModel, ModelManager, WeightsNotFound,
                                     plan_placement)


# ---- catalog ---------------------------------------------------------------------------------------
def test_catalog_matches_presets_and_adapters():
    catalog = load_catalog()
    assert [t.label for t in catalog.tabs] == ["Demo", "FLUX", "FLUX-Kontext", "Chroma", "HunyuanVideo", "Wan2.1 T2V",
                                               "Wan2.1 I2V", "Wan2.1 VACE", "FramePack", "Wan2.2 T2V", "Wan2.2 I2V",
                                               "Wan2.2 TI2V", "Wan2.2 TI2V (image)", "Qwen-Image", "Qwen-Image-Edit",
                                               "HunyuanVideo-1.5", "FLUX.2", "Z-Image"]
    assert [v.label for v in catalog.tab("wan_t2v").variants] == ["1.3B (480p)", "14B (720p)"]
    assert [v.label for v in catalog.tab("wan_i2v").variants] == ["480P", "720P"]
    assert [v.label for v in catalog.tab("framepack").variants] == ["FramePack", "FramePack-F1"]
    for tab, v in catalog.variants():
        mc = v.magcache
        preset = get_preset(mc.preset if mc.thresh is not None else mc.fallback_preset)
        if mc.thresh is not None:  # reference values written in presets.json agree with the shipped presets
            assert (mc.thresh, mc.retention_ratio, mc.K) == (preset.thresh, preset.retention_ratio, preset.K), v.id
        assert tab.transformer in adapter_by_family(preset.family).transformer_classes, v.id
        assert v.defaults["num_inference_steps"] >= 2 and v.defaults["prompt"]


# ---- plans -----------------------------------------------------------------------------------------
def test_plans_for_hub_tiny_env_and_demo_fallback(tmp_path, monkeypatch):
    real = ModelManager(tiny=False, demo_dir=tmp_path / "no_demo")
    plan = real.plan("flux")
    assert (plan.kind, plan.pipeline_source, plan.preset) == ("pretrained", "black-forest-labs/FLUX.1-dev", "flux")
    fp = real.plan("framepack", "FramePack-F1")
    assert fp.kind == "transformer+base" and fp.transformer_source == "lllyasviel/FramePack_F1_I2V_HY_20250503"
    assert fp.pipeline_source == "hunyuanvideo-community/HunyuanVideo" and fp.preset == "framepack_f1"
    assert set(fp.hub_ids) == {"hunyuanvideo-community/HunyuanVideo", "lllyasviel/FramePack_F1_I2V_HY_20250503",
                               "lllyasviel/flux_redux_bfl"}
    demo = real.plan("demo")  # no demo model yet: tiny FLUX with the FLUX preset, and a note saying so
    assert (demo.kind, demo.tiny_kind, demo.preset) == ("tiny", "flux", "flux")
    assert "demo model" in demo.notes[0]
    assert ModelManager(tiny=True).plan("wan_vace").kind == "tiny"
    monkeypatch.setenv("MAGCACHE_WEIGHTS_WAN_T2V_14B", str(tmp_path))
    with pytest.raises(WeightsNotFound, match="is not a diffusers pipeline folder, a transformer folder"):
        real.plan("wan_t2v", "14B (720p)")  # the env var points at an empty folder


# ---- budget / LRU ----------------------------------------------------------------------------------
def _fake_loader(actual_gb=None):
    """Loads nothing: each 'model' weighs its catalog estimate, or ``actual_gb[variant]`` when given."""
    actual_gb = actual_gb or {}

    def load(plan):
        size = int(actual_gb[plan.variant_id] * GB) if plan.variant_id in actual_gb else plan.estimate_bytes
        return LoadedModel(plan, pipe=object(), bytes=size, placement=None, load_seconds=0.0)
    return load


def test_lru_unloads_least_recently_used_within_budget():
    # catalog estimates (bf16): FLUX 33.7, Chroma 27.6, Wan 1.3B 14.7, HunyuanVideo 41.4 GB
    m = ModelManager(tiny=False, dtype=torch.bfloat16, budget_gb=80, loader=_fake_loader())
    for tab in ("flux", "chroma", "flux", "wan_t2v"):  # 76 GB: all fit; FLUX used more recently than Chroma
        m.get(tab)
    assert [x.plan.variant_id for x in m.loaded()] == ["chroma1_hd", "flux_dev", "wan_t2v_1_3b"]
    m.get("hunyuan_video")  # 41.4 more: Chroma, then FLUX (least recently used first) make room
    assert [x.plan.variant_id for x in m.loaded()] == ["wan_t2v_1_3b", "hunyuan_video_720p"]
    assert [e.split("|")[0] for e in m.events if e.startswith("unloaded")] == ["unloaded chroma1_hd", "unloaded flux_dev"]
    assert m.used_bytes() <= m.budget_bytes
    assert m.get("wan_t2v") is m.loaded()[-1]  # cached, now most recently used
    assert sum(e.startswith("loaded") for e in m.events) == 4


def test_a_model_larger_than_its_estimate_and_the_budget_stays_alone():
    m = ModelManager(tiny=False, dtype=torch.bfloat16, budget_gb=80, loader=_fake_loader({"chroma1_hd": 95}))
    m.get("flux")
    m.get("wan_t2v")
    m.get("chroma")  # estimate 27.6 fits next to the others, the measured 95 GB does not: the others go
    assert [x.plan.variant_id for x in m.loaded()] == ["chroma1_hd"]


def test_placement_rules():
    p = plan_placement("cpu", torch.float32, {"transformer": 30 * GB}, None)
    assert (p.device, p.dtype, p.offload, p.vae_tiling) == ("cpu", torch.float32, None, False)
    comps = {"transformer": 24 * GB, "text_encoder_2": 9 * GB, "vae": GB // 4}
    assert plan_placement("cuda", torch.bfloat16, comps, 80 * GB).offload is None
    short = plan_placement("cuda", torch.bfloat16, comps, 40 * GB)
    assert (short.offload, short.vae_tiling) == ("model", True)
    assert plan_placement("cuda", torch.bfloat16, comps, 16 * GB).offload == "sequential"
    # videos: VAE tiling once the weights take over half the free memory (decoding many frames needs the rest)
    assert plan_placement("cuda", torch.bfloat16, {"transformer": 6 * GB}, 10 * GB, video=True).vae_tiling
    assert not plan_placement("cuda", torch.bfloat16, {"transformer": 3 * GB}, 10 * GB, video=True).vae_tiling


# ---- device queue / cancellation -----------------------------------------------------------------
def test_device_lock_is_fifo_and_cancellable():
    lock = FairDeviceLock()
    order, cancel_third = [], threading.Event()
    errors = []

    def worker(name, cancel=None):
        try:
            with lock.hold(cancel):
                order.append(name)
        except Cancelled:
            errors.append(name)

    with lock.hold():
        threads = []
        for name in ("a", "b", "c", "d"):
            t = threading.Thread(target=worker, args=(name, cancel_third if name == "c" else None))
            t.start()
            threads.append(t)
            while lock.waiting < len(threads):  # queue them in a known order
                time.sleep(0.01)
        cancel_third.set()
        time.sleep(0.5)
        assert errors == ["c"] and lock.waiting == 3
    for t in threads:
        t.join(5)
    assert order == ["a", "b", "d"]


def test_cancel_tokens_per_session():
    m = ModelManager(tiny=True)
    assert not m.cancel("s1")
    token = m.cancel_token("s1")
    assert m.cancel("s1") and token.is_set()
    assert not m.cancel("s1")  # already stopped
    m.release_token("s1", token)
    assert not m.cancel("s1")


# ---- real loading: local folder, demo folder, single file ----------------------------------------
def test_loads_a_local_diffusers_folder_and_the_demo_model(tiny, tmp_path):
    folder = tmp_path / "flux"
    tiny("flux").save_pretrained(folder)
    m = ModelManager(tiny=False, demo_dir=folder)
    loaded = m.get("flux", weights=str(folder))
    assert loaded.plan.kind == "pretrained" and type(loaded.pipe).__name__ == "FluxPipeline"
    assert loaded.pipe.transformer.dtype == torch.float32 and loaded.placement.device == "cpu"
    assert loaded.bytes == sum(p.numel() * 4 for p in loaded.pipe.transformer.parameters()) + sum(
        sum(t.numel() * t.element_size() for t in list(c.parameters()) + list(c.buffers()))
        for n, c in loaded.pipe.components.items() if n != "transformer" and isinstance(c, torch.nn.Module))
    demo = m.get("demo")  # the demo tab loads its folder when model_index.json is there
    assert demo.plan.kind == "pretrained" and demo.plan.pipeline_source == str(folder)
    out = demo.pipe(prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 32, 32, 3)


_WAN_TO_ORIGINAL = [("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
                    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
                    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
                    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
                    ("condition_embedder.time_proj", "time_projection.1"), ("attn1", "self_attn"),
                    ("attn2", "cross_attn"), (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."),
                    (".to_v.", ".v."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("proj_out", "head.head"),
                    ("norm2", "norm__swap"), ("norm3", "norm2"), ("norm__swap", "norm3")]


def _save_original_wan_checkpoint(transformer, path):
    """The transformer's weights in the original (ComfyUI) key layout, as a single .safetensors file."""
    from safetensors.torch import save_file

    out = {}
    for key, value in transformer.state_dict().items():
        for a, b in _WAN_TO_ORIGINAL:
            key = key.replace(a, b)
        key = "head.modulation" if key == "scale_shift_table" else key.replace(".scale_shift_table", ".modulation")
        out["model.diffusion_model." + key] = value.contiguous()
    save_file(out, str(path))


def test_loads_a_single_file_checkpoint_with_a_local_base(tiny, tmp_path):
    pipe = tiny("wan_t2v")
    pipe.save_pretrained(tmp_path / "base")
    ckpt = tmp_path / "wan_tiny.safetensors"
    _save_original_wan_checkpoint(pipe.transformer, ckpt)
    m = ModelManager(tiny=False)
    loaded = m.get("wan_t2v", weights=str(ckpt), base=str(tmp_path / "base"))
    assert loaded.plan.kind == "single_file" and type(loaded.pipe).__name__ == "WanPipeline"
    original, reloaded = pipe.transformer.state_dict(), loaded.pipe.transformer.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)


# ---- missing weights -------------------------------------------------------------------------------
@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_missing_hub_weights_say_what_to_download_and_what_to_set(offline_empty_cache):
    m = ModelManager(tiny=False)
    with pytest.raises(WeightsNotFound) as err:
        m.get("flux")
    msg = str(err.value)
    assert "hf download black-forest-labs/FLUX.1-dev" in msg and "gated" in msg
    assert "MAGCACHE_WEIGHTS_FLUX_DEV" in msg and "MAGCACHE_TINY=1" in msg and "single-file" in msg
    with pytest.raises(WeightsNotFound) as err:
        m.get("framepack", "FramePack-F1")
    msg = str(err.value)
    for repo in ("hunyuanvideo-community/HunyuanVideo", "lllyasviel/FramePack_F1_I2V_HY_20250503", "lllyasviel/flux_redux_bfl"):
        assert f"hf download {repo}" in msg
    assert "MAGCACHE_BASE_FRAMEPACK_F1" in msg and "single-file" not in msg
    assert m.loaded() == []


def test_bad_paths_and_unsupported_single_files(tmp_path):
    m = ModelManager(tiny=False)
    with pytest.raises(WeightsNotFound, match=r"not a valid .safetensors checkpoint \(or it cannot be read\)"):
        m.plan("chroma", weights=str(tmp_path / "missing.safetensors"))
    ckpt = tmp_path / "framepack.safetensors"
    ckpt.write_bytes(b"\0" * 16)
    with pytest.raises(WeightsNotFound, match="cannot be loaded from a single file"):
        m.plan("framepack", weights=str(ckpt))
    with pytest.raises(WeightsNotFound, match="or a single-file .safetensors checkpoint that this app can read"):
        m.plan("flux", weights=__file__)


def test_stop_and_status_do_not_wait_for_a_slow_load():
    started, release = threading.Event(), threading.Event()

    def slow_loader(plan):
        started.set()
        release.wait(10)
        return LoadedModel(plan, pipe=object(), bytes=GB, placement=None, load_seconds=0.0)

    m = ModelManager(tiny=False, dtype=torch.bfloat16, budget_gb=100, loader=slow_loader)
    release.set()
    m.get("flux")  # loaded at once, so the status has something to list
    started.clear()
    release.clear()
    token = m.cancel_token("s")
    loader = threading.Thread(target=m.get, args=("chroma",))
    loader.start()
    assert started.wait(5)
    t0 = time.perf_counter()
    assert m.cancel("s") and token.is_set()
    assert [x.plan.variant_id for x in m.loaded()] == ["flux_dev"] and m.used_bytes() == GB
    assert time.perf_counter() - t0 < 1
    release.set()
    loader.join(10)
    assert [x.plan.variant_id for x in m.loaded()] == ["flux_dev", "chroma1_hd"]


def test_the_tab_catalog_is_found_in_a_checkout_and_in_an_installed_package(tmp_path, monkeypatch):
    import sys
    import tomllib

    from magcache.studio import catalog as C

    monkeypatch.delenv("MAGCACHE_PRESETS", raising=False)
    assert C.catalog_file() == C.ROOT / "presets.json"
    # installed: no checkout around the package, the data file under sys.prefix (where pyproject.toml puts it)
    data_files = tomllib.loads((C.ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    assert data_files[str(C.INSTALLED_DATA)] == ["presets.json"]
    installed = tmp_path / C.INSTALLED_DATA / "presets.json"
    installed.parent.mkdir(parents=True)
    installed.write_text((C.ROOT / "presets.json").read_text())
    monkeypatch.setattr(C, "ROOT", tmp_path / "site-packages")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert C.catalog_file() == installed and [t.id for t in C.load_catalog().tabs] == [t.id for t in load_catalog().tabs]
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="MAGCACHE_PRESETS"):
        C.load_catalog()
