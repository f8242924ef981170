"""LoRA on an optimized SD3 transformer: step time without and with a LoRA, time to switch LoRAs with
hot-swapping, and the graphs compiled on the way (the target: none after the first LoRA).

    python scripts/lora_bench.py --model sd3-medium --rank 64 --out lora.json [--mode max-speed]

The transformer alone (random weights of the architecture preset, fp16, on the GPU), one call = one
denoising step at 1024x1024 with CFG (batch 2, 333 text tokens); medians of --steps timed calls after warm-up.
Eager (plain diffusers, same weights and inputs) is timed in the same process for the ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _random_lora(transformer, rank: int, seed: int) -> dict:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2"]
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                       init_lora_weights="gaussian"), adapter_name="tmp")
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer, adapter_name="tmp").items()}
    transformer.delete_adapters("tmp")
    return sd


def _inputs(config, dtype, height=1024, width=1024, batch=2):
    g = torch.Generator("cuda").manual_seed(0)
    h, w = height // 8, width // 8
    return dict(hidden_states=torch.randn(batch, config.in_channels, h, w, generator=g, device="cuda", dtype=dtype),
                encoder_hidden_states=torch.randn(batch, 333, config.joint_attention_dim, generator=g,
                                                  device="cuda", dtype=dtype),
                pooled_projections=torch.randn(batch, config.pooled_projection_dim, generator=g, device="cuda",
                                               dtype=dtype),
                timestep=torch.full((batch,), 500.0, device="cuda", dtype=dtype), return_dict=False)


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _steps(model, x, n: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(**x)
        return statistics.median(_timed(lambda: model(**x)) for _ in range(n))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sd3-medium")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--mode", default="max-speed")
    p.add_argument("--out", default="lora.json")
    a = p.parse_args()
    from sd3plugin.environment import exit_without_cuda

    exit_without_cuda("scripts/lora_bench.py")

    import sd3plugin
    from diffusers import SD3Transformer2DModel

    from sd3plugin.models import architecture

    dtype = torch.float16
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = SD3Transformer2DModel(**architecture(a.model).transformer).to(dtype).eval()
    x = _inputs(model.config, dtype)
    lora1, lora2 = _random_lora(model, a.rank, 1), _random_lora(model, a.rank, 2)
    res = {"model": a.model, "rank": a.rank, "mode": a.mode, "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "steps_timed": a.steps}
    res["eager_step_ms"] = _steps(model, x, a.steps) * 1e3
    with torch.no_grad():
        model.load_lora_adapter(lora1, adapter_name="x", prefix=None)
        res["eager_lora_step_ms"] = _steps(model, x, a.steps) * 1e3
        model.unload_lora()

    t0 = time.perf_counter()
    sd3plugin.optimize(model, overrides=[f"mode={a.mode}", "device=cuda", f"lora_hotswap_rank={a.rank}"])
    with torch.no_grad():
        res["first_call_s"] = _timed(lambda: model(**x)) + time.perf_counter() - t0
    res["optimized_step_ms"] = _steps(model, x, a.steps) * 1e3
    rep = sd3plugin.report(model)
    res["compilations_before_lora"] = rep["compilations"]
    res["attention"] = rep["attention"]["kernel"]

    with torch.no_grad():
        res["load_first_lora_s"] = _timed(lambda: model.load_lora_adapter(lora1, adapter_name="x", prefix=None))
        res["first_call_with_lora_s"] = _timed(lambda: model(**x))
        res["optimized_lora_step_ms"] = _steps(model, x, a.steps) * 1e3
        after_first = sd3plugin.report(model)["recompilations"]
        out1 = model(**x)[0].float()
        res["hotswap_s"] = _timed(lambda: model.load_lora_adapter(lora2, adapter_name="x", hotswap=True, prefix=None))
        res["first_call_after_swap_s"] = _timed(lambda: model(**x))
        res["optimized_lora2_step_ms"] = _steps(model, x, a.steps) * 1e3
        out2 = model(**x)[0].float()
    rep = sd3plugin.report(model)
    res["recompilations_for_first_lora"] = after_first
    res["recompilations_after_swap"] = rep["recompilations"] - after_first
    res["swap_changed_output"] = bool((out1 - out2).abs().max().item() > 1e-3)
    res["cuda_graphs"] = rep.get("cuda_graphs")
    for k in ("optimized_step_ms", "optimized_lora_step_ms", "optimized_lora2_step_ms", "eager_lora_step_ms"):
        res[k.replace("_ms", "_vs_eager")] = round(res["eager_step_ms"] / res[k], 3)
    print(json.dumps(res, indent=2))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
