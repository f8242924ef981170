"""The seed document's command-line flags (onediff's text_to_image_sd3.py), translated to overrides.

    --compiler-config '{"mode": "...", "memory_format": "channels_last", "dynamic": true}'
    --quantize-config '{"quant_type": "fp8_e4m3_e4m3_dynamic"}' --quant-submodules-config-path x.json
    --compiler nexfort|none  --model ID  --height/--width/--steps/--seed/--prompt N  --saved-image out.png

become ``mode.spec=... memory_format=... dynamic=true quant=... backend=...`` and so on, so the seed's
command lines run unchanged with ``sd3plugin-run`` and ``sd3plugin-bench``.
"""
from __future__ import annotations

import json

from ..errors import ConfigError

_SIMPLE = {"--model": "model", "--height": "height", "--width": "width", "--steps": "steps",
           "--seed": "seed", "--prompt": "prompt", "--negative-prompt": "negative_prompt",
           "--guidance-scale": "guidance_scale", "--num-images": "num_images", "--output-dir": "output_dir"}
# Flags the seed script has that only the benchmark app uses (value kept as an override of its own).
_BENCH = {"--run_multiple_resolutions": "bench.multiple_resolutions", "--warmup-iterations": "bench.warmup"}
_FLAGS = ("--compiler-config", "--quantize-config", "--quant-submodules-config-path", "--compiler",
          "--saved-image", *_SIMPLE, *_BENCH)

# What each seed flag becomes, for --help: flag -> (value, what it sets).
FLAG_DOCS: dict[str, tuple[str, str]] = {
    "--compiler-config": ("JSON", "'{\"mode\": ..., \"memory_format\": ..., \"dynamic\": ...}': mode.spec, "
                                  "memory_format, dynamic; other keys: +backend_options.KEY"),
    "--quantize-config": ("JSON", "'{\"quant_type\": \"fp8_e4m3_e4m3_dynamic\"}': quant=PRESET"),
    "--quant-submodules-config-path": ("FILE", "quant.submodules_config_path=FILE"),
    "--compiler": ("NAME", "backend=NAME (none: eager, oneflow: inductor)"),
    "--saved-image": ("PATH", "image_path=PATH: the image is written to exactly PATH"),
    **{flag: ("VALUE", f"{key}=VALUE") for flag, key in _SIMPLE.items()},
    "--run_multiple_resolutions": ("0|1", "sd3plugin-bench only: bench.multiple_resolutions"),
    "--warmup-iterations": ("N", "sd3plugin-bench only: bench.warmup=N"),
}


def _quote(value) -> str:
    """Quote a value for a Hydra override (strings with special characters, JSON values)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _json_arg(flag: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} must be a JSON object, e.g. '{{\"mode\": \"max-optimize\"}}'; "
                          f"could not parse {text!r}: {exc.msg}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {text!r}")
    return value


def translate(argv: list[str], bench: bool = False) -> list[str]:
    """Replace the seed's flags in ``argv`` by Hydra overrides; other arguments pass through."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, inline = arg.partition("=")
        if flag not in _FLAGS:
            out.append(arg)
            i += 1
            continue
        if eq:
            value = inline
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{flag} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if flag == "--compiler-config":
            cc = _json_arg(flag, value)
            if "mode" in cc:
                out.append(f"mode.spec={_quote(cc.pop('mode'))}")
            if "memory_format" in cc:
                out.append(f"memory_format={cc.pop('memory_format')}")
            if "dynamic" in cc:
                out.append(f"dynamic={'true' if cc.pop('dynamic') else 'false'}")
            for key, val in cc.items():
                out.append(f"+backend_options.{key}={_quote(val) if not isinstance(val, (dict, list)) else json.dumps(val)}")
        elif flag == "--quantize-config":
            qc = _json_arg(flag, value)
            if "quant_type" not in qc:
                raise ConfigError(f"--quantize-config needs a quant_type, e.g. '{{\"quant_type\": "
                                  f"\"fp8_e4m3_e4m3_dynamic\"}}'; got {value!r}")
            out.append(f"quant={qc['quant_type']}")
        elif flag == "--quant-submodules-config-path":
            out.append(f"quant.submodules_config_path={_quote(value)}")
        elif flag == "--compiler":
            out.append("backend=" + {"none": "eager", "oneflow": "inductor"}.get(value, value))
        elif flag == "--saved-image":
            out.append(f"image_path={_quote(value)}")
        elif flag in _BENCH:
            if bench:
                out.append(f"{_BENCH[flag]}={value}")
        else:
            out.append(f"{_SIMPLE[flag]}={_quote(value) if flag in ('--prompt', '--negative-prompt', '--model', '--output-dir') else value}")
    return out
