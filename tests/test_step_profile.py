"""scripts/step_profile.py sorts a step's CUDA kernels into the groups the benchmark page reports (fp8 GEMM,
attention, quantization passes, norm/modulation...); the classification is checked here on real kernel names
of H100/H200 profiles (the script itself needs a GPU)."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "step_profile", Path(__file__).resolve().parents[1] / "scripts" / "step_profile.py")
step_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_profile)


@pytest.mark.parametrize("kernel, op, group", [
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1", "", "gemm_fp8"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNT", "aten::_scaled_mm", "gemm_fp8"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNT", "aten::mm", "gemm_16bit"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "aten::addmm", "gemm_16bit"),
    ("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90", "", "attention"),
    ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "sd3plugin::fa3_attention", "attention"),
    ("triton_red_fused_abs_amax_clamp_0", "", "quantize"),
    ("triton_poi_fused__to_copy_clamp_div_mul_3", "", "quantize"),
    ("void at::native::reduce_kernel<512, 1, ReduceOp<float, MaxOps<float>>>", "aten::amax", "quantize"),
    ("void at::native::vectorized_elementwise_kernel<4, copy<c10::Float8_e4m3fn>>", "aten::copy_", "quantize"),
    ("triton_red_fused__to_copy_abs_add_amax_mul_native_layer_norm_1", "", "norm_quantize"),
    ("triton_per_fused_add_mul_native_layer_norm_2", "", "norm_modulation"),
    ("_norm_mod_quant", "sd3plugin::fp8_norm_modulate_quantize", "norm_quantize"),  # fp8_fused_activation
    ("_gelu_quant", "sd3plugin::fp8_gelu_quantize", "norm_quantize"),
    ("void at::native::vectorized_layer_norm_kernel<float>", "aten::native_layer_norm", "norm_modulation"),
    ("triton_poi_fused_add_mul_5", "", "elementwise"),
    ("void at::native::elementwise_kernel<128, 2>", "aten::add", "other"),
    ("Memcpy DtoD (Device -> Device)", "", "other"),
])
def test_kernel_groups(kernel, op, group):
    assert step_profile.kernel_group(kernel, op) == group


def test_group_totals_name_every_group():
    rows = [{"group": "gemm_fp8", "ms_per_step": 1.5, "calls_per_step": 2},
            {"group": "gemm_fp8", "ms_per_step": 0.25, "calls_per_step": 1},
            {"group": "quantize", "ms_per_step": 0.1, "calls_per_step": 4}]
    out = step_profile.group_rows(rows)
    assert set(out) == set(step_profile.GROUPS)
    assert out["gemm_fp8"] == {"ms_per_step": 1.75, "calls_per_step": 3}
    assert out["attention"] == {"ms_per_step": 0.0, "calls_per_step": 0}


def test_fp8_summary_reads_a_bench_result():
    """scripts/fp8_summary.py turns a bench.json (here the H100 fp8 run of docs/benchmarks) into the issue's
    figures: speedup = it/s ratio to eager of the same run, PSNR, E2E, first call, each target met or not."""
    spec = importlib.util.spec_from_file_location(
        "fp8_summary", Path(__file__).resolve().parents[1] / "scripts" / "fp8_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import json

    bench = json.loads((Path(__file__).resolve().parents[1] / "docs" / "benchmarks" /
                        "h100-sd3-medium-fp8-fa4.json").read_text())
    out = mod.summarize(bench)
    assert out["variant"] == "fp8+fa4" and out["speedup"] == pytest.approx(1.643, abs=1e-3)
    assert out["targets"]["psnr_db"]["met"] is True and out["targets"]["speedup"]["met"] is False
    assert out["first_call_seconds"] == pytest.approx(79.53, abs=0.01)
    both = mod.compare(bench, "fp8+fa4", "eager")  # a variant against another of the same run
    assert both["speedup_vs_base"] == pytest.approx(1.643, abs=1e-3) and both["base"]["variant"] == "eager"
    assert both["e2e_delta_seconds"] == pytest.approx(both["e2e_seconds"] - both["base"]["e2e_seconds"], abs=1e-3)
