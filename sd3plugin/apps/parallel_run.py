"""One rank of ``sd3plugin-run parallel=...`` (started by ``parallel_launch``): the pipeline loads through the
hook with the changes xDiT's path keeps, xDiT wraps it, one warm-up call compiles, one timed call generates;
the rank that holds the image writes it and the reports, as ``generate`` does for one process."""
from __future__ import annotations

import os
import time

from omegaconf import DictConfig, OmegaConf


def effective_config(cfg: DictConfig) -> tuple[DictConfig, list[str]]:
    """``cfg`` with the changes xDiT's path does not keep turned off, and the line for each."""
    from ..config.parallel import adjustments

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    lines = []
    for adj in adjustments(cfg):
        OmegaConf.update(out, adj.key, adj.value, merge=False)
        lines.append(adj.line)
    return out, lines


def check_rank(cfg: DictConfig) -> None:
    """Before anything loads in a rank: as many ranks as the preset needs, the GPUs, xfuser (ConfigError)."""
    from ..config.parallel import label, world_size
    from ..errors import ConfigError
    from .parallel_launch import check_machine

    need, got = world_size(cfg.parallel), int(os.environ.get("WORLD_SIZE", "0") or 0)
    if got != need:
        raise ConfigError(f"{label(cfg.parallel)} needs {need} processes but torch.distributed.run started {got}; "
                          f"start it with --nproc-per-node={need}, or let `sd3plugin-run {label(cfg.parallel)}` "
                          "start it")
    check_machine(cfg)


def generate_parallel(cfg: DictConfig) -> dict | None:
    import torch

    import sd3plugin

    from ..compat import xfuser as xf
    from ..config.parallel import world_size, xfuser_args
    from ..kernels.attention import SD3AttnProcessor
    from ..pipeline import call_kwargs, load_pipeline, output_dir, resolution, synchronize
    from .metrics import StepTimer, peak_memory_gib, reset_peak_memory
    from .run_report import image_paths, save_images, summary, versions, write_reports

    check_rank(cfg)
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    run_cfg, notes = effective_config(cfg)
    height, width = resolution(run_cfg)
    xf.accept_processor(SD3AttnProcessor)
    engine_cfg, _ = xf.engine_config(xfuser_args(run_cfg, height, width))

    t0 = time.perf_counter()
    with sd3plugin.enabled(run_cfg):
        pipe = load_pipeline(run_cfg)
    rep = sd3plugin.report(pipe)
    xpipe = xf.wrap_pipeline(pipe, engine_cfg)
    load_s = time.perf_counter() - t0

    reset_peak_memory("cuda")
    t0 = time.perf_counter()
    xpipe(**call_kwargs(run_cfg, output_type="latent"))
    synchronize("cuda")
    warmup_s = time.perf_counter() - t0

    timer = StepTimer("cuda")
    kwargs = call_kwargs(run_cfg)
    torch.distributed.barrier()
    timer.start()
    t0 = time.perf_counter()
    output = xpipe(**kwargs, callback_on_step_end=timer)
    synchronize("cuda")
    e2e_s = time.perf_counter() - t0

    result = None
    if xf.holds_output(xpipe):
        out = output_dir(cfg)
        paths = save_images(output.images, image_paths(len(output.images), cfg.image_path, out))
        composed = rep.pop("config", OmegaConf.to_container(run_cfg, resolve=True))
        result = {
            "images": paths, "output_dir": str(out.resolve()), "device": "cuda", "load_seconds": round(load_s, 3),
            "warmup_seconds": round(warmup_s, 3), "iterations_per_second": round(timer.its, 3),
            "e2e_seconds": round(e2e_s, 3), "peak_memory_gib": round(peak_memory_gib("cuda"), 3),
            "height": kwargs["height"], "width": kwargs["width"], "steps": kwargs["num_inference_steps"],
            "parallel": {"world_size": world_size(cfg.parallel), "rank": int(os.environ.get("RANK", 0)),
                         "xfuser": xf.version(), "not_kept": notes},
            "optimization": rep, "config": composed, "versions": versions(),
        }
        write_reports(result, out)
        print(summary(result, out), flush=True)
    xf.shutdown()
    return result
