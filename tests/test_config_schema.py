"""The schema: enums and choice tables from one source each, generated preset groups, env-default keys,
and config's place at the bottom of the layers (it imports nothing of sd3plugin above it)."""
import ast
import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import sd3plugin
from sd3plugin.config import compose, schema
from sd3plugin.config.choices import (ATTENTION_KERNELS, DEVICES, DTYPES, MEMORY_FORMATS, ON_ERROR, Attention,
                                      Device, Dtype, MemoryFormat, OnError, values)
from sd3plugin.config.presets import GENERATED_GROUPS, conf_dir, group_options
from sd3plugin.config.quant_presets import QUANT_PRESETS

CONFIG_DIR = Path(schema.__file__).parent


@pytest.mark.parametrize("enum, table", [(OnError, ON_ERROR), (Device, DEVICES), (Dtype, DTYPES),
                                         (MemoryFormat, MEMORY_FORMATS), (Attention, ATTENTION_KERNELS)])
def test_enums_are_their_tables_and_behave_as_strings(enum, table):
    assert values(enum) == table
    for member in enum:
        assert member == member.value and str(member) == member.value and f"{member}" == member.value
        assert f"{member!r}" == repr(member.value) and hash(member) == hash(member.value)


def test_enum_keys_compose_from_plain_words_and_print_plainly():
    cfg = compose(overrides=["on_error=raise", "device=cpu", "dtype=bfloat16", "attention=sdpa",
                             "memory_format=preserve"])
    assert cfg.on_error == "raise" and cfg.device == "cpu" and cfg.dtype == "bfloat16" and cfg.attention == "sdpa"
    text = OmegaConf.to_yaml(cfg)
    assert "on_error: raise" in text and "device: cpu" in text and "name: preserve" in text


def test_attention_kernels_come_from_the_config_table():
    from sd3plugin.kernels import attention

    assert attention.KERNELS is ATTENTION_KERNELS


def test_backend_registry_uses_the_config_names():
    from sd3plugin.backends import backend_names, register_backend, unregister_backend
    from sd3plugin.backends.eager import EagerBackend

    assert set(backend_names()) == set(schema.BACKENDS) - {"auto"}
    with pytest.raises(sd3plugin.ConfigError, match="backend='plugin_x' is not valid"):
        compose(overrides=["backend=plugin_x"])
    register_backend("plugin_x")(type("PluginX", (EagerBackend,), {}))
    try:  # a plugin's backend becomes a valid choice of the one table
        assert "plugin_x" in schema.BACKENDS and compose(overrides=["backend=plugin_x"]).backend == "plugin_x"
    finally:
        unregister_backend("plugin_x")
    assert "plugin_x" not in schema.BACKENDS
    with pytest.raises(ValueError, match="'auto' is not a backend"):
        register_backend("auto")


def test_quant_group_is_generated_from_the_one_table():
    from sd3plugin import quant

    assert group_options("quant") == sorted(QUANT_PRESETS)
    assert set(quant.PRESETS) == set(QUANT_PRESETS)
    for name, technique in quant.PRESETS.items():  # quant's presets are the table's, plus the torchao builder
        assert {f.name: getattr(technique, f.name) for f in dataclasses.fields(QUANT_PRESETS[name])} == \
            dataclasses.asdict(QUANT_PRESETS[name])
    for group in GENERATED_GROUPS:  # no YAML file repeats a generated preset
        assert not list((conf_dir() / group).glob("*.yaml")), group
    assert group_options("memory_format") == sorted(MEMORY_FORMATS)
    for name in QUANT_PRESETS:
        assert compose(overrides=[f"quant={name}"]).quant.type == name
        assert compose({"quant": name}).quant.type == name  # a preset name in a dict/YAML config


def test_dynamic_group_from_yaml_bool_or_string():
    assert compose({"dynamic": True}).dynamic.enabled is True
    assert compose({"dynamic": "false"}).dynamic.enabled is False
    assert compose(overrides=["dynamic=true"]).dynamic.enabled is True


def test_new_keys_and_their_defaults(monkeypatch):
    for var in ("SD3PLUGIN_JOINT_ATTENTION", "SD3PLUGIN_FA4_PREWARM", "SD3PLUGIN_KEEP_COORDESC"):
        monkeypatch.delenv(var, raising=False)
    cfg = compose()
    assert cfg.joint_attention is True and cfg.fa4_prewarm is True and cfg.keep_coordesc is True
    assert cfg.lora_hotswap_rank is None
    assert compose(overrides=["lora_hotswap_rank=64"]).lora_hotswap_rank == 64
    with pytest.raises(sd3plugin.ConfigError, match="lora_hotswap_rank=0 must be at least 1"):
        compose(overrides=["lora_hotswap_rank=0"])


@pytest.mark.parametrize("key, var", [("joint_attention", "SD3PLUGIN_JOINT_ATTENTION"),
                                      ("fa4_prewarm", "SD3PLUGIN_FA4_PREWARM"),
                                      ("keep_coordesc", "SD3PLUGIN_KEEP_COORDESC")])
def test_environment_switches_are_defaults_that_the_config_overrides(monkeypatch, key, var):
    monkeypatch.setenv(var, "0")
    assert compose()[key] is False
    assert compose(overrides=[f"{key}=true"])[key] is True  # an explicit key wins over the variable
    assert compose({key: True})[key] is True
    monkeypatch.setenv(var, "1")
    assert compose()[key] is True
    monkeypatch.setenv(var, "banana")
    with pytest.raises(sd3plugin.ConfigError, match=f"{key}: environment variable {var} must be 0 or 1"):
        compose()


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported at import time (module level, not inside functions), relative ones resolved."""
    pkg = "sd3plugin." + ".".join(path.relative_to(CONFIG_DIR.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1] if node.level else []
            out.add(".".join(base + ([node.module] if node.module else [])))
    return out


def test_config_imports_nothing_above_it():
    for path in sorted(CONFIG_DIR.glob("*.py")):
        for module in _top_level_imports(path):
            if module.startswith("sd3plugin"):
                assert module.startswith(("sd3plugin.config", "sd3plugin.errors", "sd3plugin.compat")), \
                    f"{path.name} imports {module} at import time"
            assert module.split(".")[0] not in ("torch", "diffusers"), f"{path.name} imports {module}"


def test_every_schema_dataclass_field_is_typed_for_hydra():
    cfg = OmegaConf.structured(schema.SD3PluginConfig)
    assert list(cfg.keys()) == list(schema.top_level_keys())
    assert schema.is_known_key("backend_options.anything") and schema.is_known_key("quant.include")
    assert not schema.is_known_key("stepz") and not schema.is_known_key("quant.typo")
