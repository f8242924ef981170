"""The cache fingerprint hashes exactly the schema's compile keys: each one changes it, no run key does."""
import ast
from enum import Enum
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from sd3plugin.cache.manifest import compile_config, fingerprint
from sd3plugin.config import compose, compile_keys, run_keys
from sd3plugin.config.quant_presets import QUANT_TYPES
from sd3plugin.config.schema import BACKENDS, leaf_fields

EXPECTED_COMPILE_KEYS = {
    "model", "backend", "mode.spec", "memory_format.name", "dynamic.enabled", "dynamic.recompile_limit",
    "quant.type", "quant.submodules_config_path", "quant.top_percentage", "quant.include", "quant.exclude",
    "backend_options", "fuse_qkv", "fuse_gelu", "attention", "joint_attention", "compile_vae",
    "compile_text_encoders", "fp8_fused_activation",
    "lora_hotswap_rank", "device", "dtype",
    "parallel.cfg", "parallel.ulysses", "parallel.ring", "parallel.pipefusion", "parallel.patches",
    "step_cache.name", "step_cache.fn", "step_cache.bn", "step_cache.threshold", "step_cache.warmup",
    "step_cache.max_cached", "step_cache.max_continuous", "step_cache.taylorseer_order",
}
EXPECTED_RUN_KEYS = {
    "mode.name", "mode.description", "cache_dir", "on_error", "fa4_prewarm", "keep_coordesc", "precompiled", "prompt",
    "negative_prompt", "height", "width", "steps", "guidance_scale", "seed", "num_images", "output_dir",
    "image_path", "parallel.name", "parallel.launch",
}
FIELDS = dict(leaf_fields())
TABLES = {"quant.type": QUANT_TYPES, "backend": BACKENDS, "model": ("sd3-medium", "a/hub-id")}


def test_compile_keys_are_the_expected_list_and_every_field_is_classified():
    assert set(compile_keys()) == EXPECTED_COMPILE_KEYS
    assert set(run_keys()) == EXPECTED_RUN_KEYS
    for key, f in FIELDS.items():  # a new field declared with plain field() has no kind: fails here
        assert isinstance(f.metadata.get("compile"), bool), f"schema field {key} is neither compile nor run"
    assert set(FIELDS) == EXPECTED_COMPILE_KEYS | EXPECTED_RUN_KEYS


def _alternatives(key, value):
    """Values other than ``value`` the key can take (every enum member, the other bool, ...)."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if key in TABLES:
        return [v for v in TABLES[key] if v != value]
    if isinstance(value, Enum):
        return [m for m in type(value) if m != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1]
    if isinstance(value, float):
        return [value / 2]
    if isinstance(value, str):
        return [value + "-other"]
    if isinstance(value, list):
        return [["transformer_blocks.0.*"]]
    if isinstance(value, dict):
        return [{"some_option": 1}]
    assert value is None, (key, value)
    return [8] if "int" in str(FIELDS[key].type) else ["/elsewhere/x"]


@pytest.fixture
def gpu_visible(monkeypatch):
    """device=auto/cuda/cpu then resolve differently; nothing here touches a real GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def _changed(cfg, key, alt):
    changed = cfg.copy()
    OmegaConf.update(changed, key, alt, merge=False)
    return changed


@pytest.mark.parametrize("key", sorted(EXPECTED_COMPILE_KEYS))
def test_each_compile_key_changes_the_fingerprint(key, gpu_visible):
    # A parallel key counts once the run is parallel, a step-cache key once a step cache is on (parallel=none
    # and step_cache=none keep the fingerprints they had before those groups existed).
    cfg = compose(overrides=["parallel=pipefusion2"] if key.startswith("parallel.")
                  else ["step_cache=dbcache"] if key.startswith("step_cache.") else [])
    base = fingerprint(cfg)
    value = OmegaConf.select(cfg, key)
    results = {str(alt): fingerprint(_changed(cfg, key, alt)) for alt in _alternatives(key, value)}
    assert any(fp != base for fp in results.values()), f"{key}: {value!r} -> {results} keeps {base}"


@pytest.mark.parametrize("key", sorted(EXPECTED_RUN_KEYS))
def test_run_keys_leave_the_fingerprint_alone(key, gpu_visible):
    cfg = compose()
    base = fingerprint(cfg)
    value = OmegaConf.select(cfg, key)
    for alt in _alternatives(key, value):
        assert fingerprint(_changed(cfg, key, alt)) == base, (key, alt)


def test_fuse_gelu_and_the_joint_attention_switch_are_in_the_fingerprint(monkeypatch):
    base = fingerprint(compose())
    assert fingerprint(compose(overrides=["fuse_gelu=false"])) != base
    monkeypatch.setenv("SD3PLUGIN_JOINT_ATTENTION", "0")  # the environment default of a compile key
    cfg = compose()
    assert cfg.joint_attention is False and fingerprint(cfg) != base
    monkeypatch.setenv("SD3PLUGIN_JOINT_ATTENTION", "1")
    monkeypatch.setenv("SD3PLUGIN_FA4_PREWARM", "0")  # a run key's environment default
    monkeypatch.setenv("SD3PLUGIN_KEEP_COORDESC", "0")
    cfg = compose()
    assert cfg.fa4_prewarm is False and cfg.keep_coordesc is False and fingerprint(cfg) == base


def test_step_cache_none_keeps_old_fingerprints_and_each_preset_has_its_own():
    base = compile_config(compose())
    assert "step_cache" not in base
    from sd3plugin.config.step_cache import STEP_CACHE_PRESETS

    fps = {name: fingerprint(compose(overrides=[f"step_cache={name}"])) for name in STEP_CACHE_PRESETS}
    assert fps["none"] == fingerprint(compose()) and len(set(fps.values())) == len(fps)


def test_compile_config_is_nested_like_the_config_and_plain_json():
    data = compile_config(compose(overrides=["quant=int8_dynamic", "device=cpu"]))
    assert data["mode"] == {"spec": "max-optimize:low-precision"}
    assert data["quant"]["type"] == "int8_dynamic" and data["device"] == "cpu" and data["dtype"] == "float32"
    assert type(data["attention"]) is str and type(data["memory_format"]["name"]) is str  # enums as strings
    assert "prompt" not in data and "steps" not in data and data["architecture"]["num_layers"] == 2


def test_manifest_does_not_import_optimize():
    tree = ast.parse(Path(__import__("sd3plugin.cache.manifest", fromlist=["x"]).__file__).read_text())
    modules = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("optimize" in m or m.startswith(("..backends", "backends")) for m in modules), modules
    assert not hasattr(__import__("sd3plugin.cache.manifest", fromlist=["x"]), "COMPILE_KEYS")
