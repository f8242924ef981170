"""First images in fresh processes: from a shipped cache (``sd3plugin-cache warm/pack/install/verify``) and
from an empty cache (a fresh ``sd3plugin-run``), each with the variant's settings rebuilt as overrides."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from .options import BenchConfig, label_slug

log = logging.getLogger("sd3plugin")


def shipped_cache_start(cfg, model_folder: str, out: Path, label: str, bench: BenchConfig) -> dict:
    """Warm start from a shipped cache, as users do it: ``sd3plugin-cache warm`` into an empty dir,
    ``pack``, ``install`` into another empty dir, ``verify`` (each a fresh process). Falls back to a
    fresh ``sd3plugin-run`` on the variant's own cache when the cache CLI is not there."""
    import importlib.util

    from ...pipeline import resolution

    if importlib.util.find_spec("sd3plugin.cli.cmd_verify") is None:
        return process_first_image(cfg, model_folder, out / "caches" / label_slug(label), out, label, bench)
    root = out / "caches" / f"{label_slug(label)}-shipped"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ci, serve, archive = root / "ci", root / "installed", root / "cache.tar.zst"
    ovs = variant_command_overrides(cfg) + [f"model={model_folder}"]
    h, w = resolution(cfg)
    cli = [sys.executable, "-m", "sd3plugin.cli.cache"]
    steps = [
        ("warm", ["warm", "--json", "--no-progress", "--cache-dir", str(ci), "--resolutions", f"{w}x{h}",
                  "--batch-sizes", str(cfg.num_images), *ovs]),
        ("pack", ["pack", "--json", "--cache-dir", str(ci), "-o", str(archive)]),
        ("install", ["install", "--json", str(archive), "--cache-dir", str(serve)]),
        ("verify", ["verify", "--json", "--cache-dir", str(serve), *ovs]),
    ]
    env = child_env()
    info: dict = {"method": "sd3plugin-cache warm/pack/install/verify"}
    try:
        for name, args in steps:
            t0 = time.perf_counter()
            code, data, err = _cli_json(cli + args, env, bench.subprocess_timeout)
            info[f"{name}_process_seconds"] = time.perf_counter() - t0
            if code != 0:
                info["error"] = f"sd3plugin-cache {name} exited {code}: {data.get('error') or err}"
                log.warning("sd3plugin-bench: %s: %s", label, info["error"])
                return info
            if name == "pack":
                info["archive_bytes"] = data.get("archive_bytes")
            if name == "verify":
                info.update(first_call_seconds=data.get("first_image_seconds"),
                            load_seconds=data.get("load_seconds"), import_seconds=data.get("import_seconds"),
                            time_to_first_image_seconds=data.get("time_to_first_image_seconds"),
                            fresh_compilations=data.get("fresh_compilations"),
                            fxgraph_cache_hit=data.get("fxgraph_cache_hit"),
                            precompiled_used=bool((data.get("precompiled") or {}).get("used")),
                            startup=data.get("startup"))
    finally:
        if not bench.keep_caches:
            shutil.rmtree(root, ignore_errors=True)
    return info


def process_first_image(cfg, model_folder: str, cache_dir: Path, out: Path, label: str,
                        bench: BenchConfig) -> dict:
    """Time to the first image in a fresh ``sd3plugin-run`` process using ``cache_dir`` (as shipped)."""
    run_dir = out / "runs" / label_slug(label)
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = variant_command_overrides(cfg) + [f"model={model_folder}", f"cache_dir={cache_dir}",
                                                  f"output_dir={run_dir}", "hydra.run.dir=" + str(run_dir)]
    cmd = [sys.executable, "-m", "sd3plugin", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=bench.subprocess_timeout)
    wall = time.perf_counter() - t0
    info = {"command": " ".join(cmd), "exit_code": proc.returncode, "process_seconds": wall}
    report_file = run_dir / "report.json"
    if proc.returncode != 0 or not report_file.is_file():
        info["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        log.warning("sd3plugin-bench: %s warm start failed: %s", label, info["error"])
        return info
    rep = json.loads(report_file.read_text())
    info.update(load_seconds=rep.get("load_seconds"), first_call_seconds=rep.get("warmup_seconds"),
                first_image_seconds=(rep.get("load_seconds") or 0) + (rep.get("warmup_seconds") or 0))
    return info


def _cli_json(cmd: list[str], env: dict, timeout: int) -> tuple[int, dict, str]:
    """Run one ``sd3plugin-cache ... --json`` command: (exit code, its JSON object, stderr tail)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    text = proc.stdout.strip()
    try:
        data = json.loads(text[text.index("{"):]) if "{" in text else {}
    except ValueError:
        data = {}
    return proc.returncode, data, "\n".join((proc.stderr or "").strip().splitlines()[-5:])


def child_env() -> dict:
    """The environment of a child process: this one's, with the folder holding this sd3plugin first on
    PYTHONPATH, so the child imports the same code."""
    import sd3plugin

    env = dict(os.environ)
    root = str(Path(sd3plugin.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    return env


def variant_command_overrides(cfg) -> list[str]:
    """The overrides that rebuild ``cfg``'s optimization settings on a command line."""
    c = OmegaConf.to_container(cfg, resolve=True)
    ovs = [f"backend={c['backend']}", f"mode.spec='{c['mode']['spec']}'",
           f"memory_format={c['memory_format']['name']}", f"dynamic={'true' if c['dynamic']['enabled'] else 'false'}",
           f"quant={c['quant']['type']}", f"fuse_qkv={str(c['fuse_qkv']).lower()}",
           f"fuse_gelu={str(c['fuse_gelu']).lower()}",
           f"compile_vae={str(c['compile_vae']).lower()}",
           f"compile_text_encoders={str(c['compile_text_encoders']).lower()}",
           f"fp8_fused_activation={str(c.get('fp8_fused_activation', False)).lower()}",
           f"device={c['device']}", f"dtype={c['dtype']}",
           f"steps={c['steps']}", f"seed={c['seed']}", f"guidance_scale={c['guidance_scale']}",
           f"num_images={c['num_images']}", f"attention={c['attention']}", "prompt=" + _quoted(c["prompt"])]
    q = c["quant"]
    if q.get("submodules_config_path"):
        ovs += ["quant.submodules_config_path=" + _quoted(q["submodules_config_path"]),
                f"quant.top_percentage={q['top_percentage']}"]
    for key in ("include", "exclude"):
        if q.get(key):
            ovs.append(f"quant.{key}=" + json.dumps(q[key]))
    if c.get("negative_prompt"):
        ovs.append("negative_prompt=" + _quoted(c["negative_prompt"]))
    if c.get("height"):
        ovs.append(f"height={c['height']}")
    if c.get("width"):
        ovs.append(f"width={c['width']}")
    for k, v in (c.get("backend_options") or {}).items():
        ovs.append(f"+backend_options.{k}={json.dumps(v)}")
    return ovs


def _quoted(text: str) -> str:
    return "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"
