#!/usr/bin/env bash
# Reruns every GPU measurement of docs/benchmarks/ (H100, SD3 architectures with random weights).
#
#   pip wheel --no-deps -w .whl .          # on the host: a wheel of the current code beside the deps
#   bash scripts/gpu_bench.sh SECTION...   # on the GPU machine; results under $OUT (default ./gpu-out)
#
# Sections: env | attn | gelu | profile | fp8profile | fp8fusedprofile | fp8act | fp8e2e | fp8fused | e2e16 | attn8 | attn8quant | fa4 | fa4quant | fa3 | speed | dynamic | sd35 | cache | warmtrace | quant | quantrest | vae   (all: every one, in that order; about 25 minutes
# in all on an H100, so run them in several device calls, RUN_LIMIT=seconds caps each run).
# attn, fa4, fa4quant, fa3 and sd35 need FlashAttention-4 (scripts/fa4-wheels.sh fetches the wheels for an offline
# GPU machine); fa3 (and attn's FA3 rows) need fa3-fwd 0.0.3 on an H100 / H200 with a CUDA 13 torch
# (pip download --no-deps fa3-fwd==0.0.3 -d .whl). Each section is one sd3plugin-bench (or sd3plugin-cache) run; its bench.json/.md/.png land in
# $OUT/<section>/ and are copied to docs/benchmarks/<section>/ by hand after review.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
export SD3PLUGIN_CACHE_DIR=${SD3PLUGIN_CACHE_DIR:-/root/sd3cache}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c 'import sd3plugin.conf' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null || {
  echo "error: scripts/gpu_bench.sh measures on a CUDA GPU and torch sees none here (or does not import); run it on the GPU machine" >&2
  exit 2
}
BENCH="python3 -m sd3plugin.apps.bench"
COMMON="model=sd3-medium steps=28 guidance_scale=7.0 bench.repeat=3"

run() {  # run NAME ARGS...: one bench run into $OUT/NAME, log beside it
  local name=$1; shift
  local work=${WORK:-/tmp/sd3bench}/$name
  mkdir -p "$OUT/$name" "$work"
  echo "=== $name: $BENCH $*" | tee "$OUT/$name/log.txt"
  local t0=$SECONDS
  # From /tmp: the repository's own sd3plugin/ (without conf/) must not shadow the installed package.
  # RUN_LIMIT (seconds) stops one run early so that the next sections and the copies still happen.
  (cd /tmp && timeout ${RUN_LIMIT:-0} $BENCH "$@" output_dir="$work" hydra.run.dir="$work/hydra") \
      >> "$OUT/$name/log.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s"
  cp "$work"/bench.json "$work"/bench.md "$work"/bench.png "$OUT/$name/" 2>/dev/null
  [ -f "$OUT/$name/bench.md" ] && sed -n '/^| variant/,/^$/p' "$OUT/$name/bench.md"
  [ $rc -ne 0 ] && tail -20 "$OUT/$name/log.txt"
  return $rc
}

cache_flow() {  # cache_flow MODE: the CI-image workflow of docs/cache.md, timed, for one mode preset
  local mode=$1 dir=$OUT/cache-$1 work=/tmp/sd3cacheflow-$1 ci=/root/cache-ci-$1 serve=/root/cache-serve-$1 arc=/root/sd3-$1.tar.zst
  local model=$SD3PLUGIN_CACHE_DIR/models/sd3-medium-float16
  local ovs="model=$model mode=$mode steps=28"
  mkdir -p "$dir" "$work"; rm -rf "$ci" "$serve" "$arc"
  [ -f "$model/model_index.json" ] || (cd /tmp && python3 -c "
from sd3plugin.config import compose; from sd3plugin.pipeline import model_path
print(model_path(compose(None, ['model=sd3-medium'])))")
  local cache="python3 -m sd3plugin.cli.cache"
  (cd /tmp
   set -x
   $cache warm --json --no-progress --cache-dir "$ci" --resolutions 1024x1024 $ovs > "$work/warm.json"
   $cache pack --json --cache-dir "$ci" -o "$arc" > "$work/pack.json"
   $cache install --json "$arc" --cache-dir "$serve" > "$work/install.json"
   [ -n "${SKIP_COLD:-}" ] || $cache verify --json --cold --cache-dir "$serve" $ovs > "$work/verify_cold.json"
   if [ -n "${PROFILE:-}" ]; then export SD3PLUGIN_VERIFY_PROFILE=$dir/profile_warm.txt; fi
   $cache verify --json --cache-dir "$serve" $ovs > "$work/verify_warm.json"
   unset SD3PLUGIN_VERIFY_PROFILE
   # the experimental coordinate-descent fix, and a cold start without the FA4 prewarm child
   [ -z "${KEEP_TOO:-}" ] || SD3PLUGIN_KEEP_COORDESC=1 $cache verify --json --cache-dir "$serve" $ovs > "$work/verify_keep.json"
   [ -z "${COLD_NOPREWARM:-}" ] || SD3PLUGIN_FA4_PREWARM=0 $cache verify --json --cold --cache-dir "$serve" $ovs > "$work/verify_cold_noprewarm.json"
  ) > "$dir/log.txt" 2>&1
  echo "cache $mode: exit $?; archive $(du -h "$arc" | cut -f1)"
  python3 - "$work" "$dir" <<'PY'
import json, sys, pathlib
d, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
allr = {}
for name in ("warm", "pack", "install", "verify_cold", "verify_warm", "verify_keep", "verify_cold_noprewarm"):
    try:
        r = allr[name] = json.loads((d / f"{name}.json").read_text())
    except Exception as exc:
        print(name, "no JSON:", exc); continue
    keys = [k for k in ("seconds", "elapsed_seconds", "size_bytes", "files", "time_to_first_image_seconds",
                        "load_seconds", "first_image_seconds", "fresh_compilations", "fxgraph_cache_hit", "ok",
                        "exit_code", "error", "attention", "keep_coordesc") if k in r]
    print(name, {k: r[k] for k in keys})
    for shape in r.get("shapes", []) if isinstance(r.get("shapes"), list) else []:
        print("   ", {k: v for k, v in shape.items() if not isinstance(v, (dict, list))})
(out / "cache.json").write_text(json.dumps(allr, indent=2))
PY
}

section() {
  case $1 in
    env)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      python3 -c 'import torch, triton, diffusers; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), triton.__version__, diffusers.__version__)'
      ;;
    attn)  # attention kernels alone at SD3-medium's shape
      mkdir -p "$OUT/attn"; (cd /tmp && python3 "$OLDPWD/scripts/attn_bench.py" --out "$OUT/attn/attn.json") 2>&1 | tail -12
      ;;
    fa4)  # the attention kernel inside the whole step: sdpa (cuDNN) against FlashAttention-4, fastest mode
      run fa4 $COMMON bench.cache_warmup=false \
        "bench.variants='max-speed+sdpa=mode=max-speed attention=sdpa; max-speed+fa4=mode=max-speed attention=fa4'"
      ;;
    gelu)  # bias + tanh-GELU in the matmul epilogue (fuse_gelu) against the separate pass, fastest mode
      run gelu $COMMON bench.cache_warmup=false \
        "bench.variants='max-speed+fa4=mode=max-speed attention=fa4 fuse_gelu=false; max-speed+fa4+gelu=mode=max-speed attention=fa4 fuse_gelu=true'"
      ;;
    profile)  # kernel time of one step by group, joint-attention op on and off (no CUDA graphs)
      mkdir -p "$OUT/profile"
      (cd /tmp && python3 "$OLDPWD/scripts/step_profile.py" "$OUT/profile/joint.json" attention=fa4 | tail -14
       SD3PLUGIN_JOINT_ATTENTION=0 python3 "$OLDPWD/scripts/step_profile.py" "$OUT/profile/separate.json" attention=fa4 | head -1)
      ;;
    fp8profile)  # kernel time of one fp8-preset step by group (fp8 GEMM, attention, quantize passes...), and eager bf16
      mkdir -p "$OUT/profile"
      (cd /tmp && python3 "$OLDPWD/scripts/step_profile.py" "$OUT/profile/fp8.json" quant=fp8_e4m3_e4m3_dynamic | tail -26
       python3 "$OLDPWD/scripts/step_profile.py" "$OUT/profile/eager-bf16.json" backend=eager dtype=bfloat16 | head -1)
      ;;
    fp8fusedprofile)  # the same profile with fp8_fused_activation=true (quantize passes folded into norm/GELU)
      mkdir -p "$OUT/profile"
      (cd /tmp && python3 "$OLDPWD/scripts/step_profile.py" "$OUT/profile/fp8-fused.json" quant=fp8_e4m3_e4m3_dynamic \
          fp8_fused_activation=true | tail -26)
      ;;
    attn8)  # 8-bit attention in the whole step, fastest mode, against FA4 (fp16, batch 1)
      run attn8 $COMMON bench.cache_warmup=false \
        "bench.variants='max-speed+fa4=mode=max-speed attention=fa4; max-speed+int8=mode=max-speed attention=int8; max-speed+int8_fp8=mode=max-speed attention=int8_fp8'"
      ;;
    attn8quant)  # fp8 linear layers with 8-bit attention (bf16, batch 2, the quantization issue's setting)
      run attn8quant $COMMON dtype=bfloat16 num_images=2 bench.cache_warmup=false \
        "bench.variants='fp8+int8_fp8=mode=max-speed quant=fp8_e4m3_e4m3_dynamic attention=int8_fp8; fp8+int8=mode=max-speed quant=fp8_e4m3_e4m3_dynamic attention=int8'"
      ;;
    fa4quant)
      run fa4quant $COMMON dtype=bfloat16 num_images=2 bench.cache_warmup=false \
        "bench.variants='fp8+fa4=mode=max-speed quant=fp8_e4m3_e4m3_dynamic attention=fa4'"
      ;;
    fa3)  # fp8 attention (FlashAttention-3, one scale per batch and head) against FA4, both with fp8 linear
          # layers, fastest mode (bf16, batch 1): it/s, E2E, latents rel. err and PSNR against bf16 eager
      run fa3 $COMMON dtype=bfloat16 bench.cache_warmup=false \
        "bench.variants='fp8+fa4=mode=max-speed quant=fp8_e4m3_e4m3_dynamic attention=fa4; fp8+fa3_fp8=mode=max-speed quant=fp8_e4m3_e4m3_dynamic attention=fa3_fp8'"
      ;;
    speed)  # eager against the mode presets at 1024x1024 (compile caches cold per variant)
      run speed $COMMON bench.cache_warmup=false \
        "bench.variants='default=mode=default; default+cudagraphs=mode.spec=max-optimize:low-precision:cudagraphs; none+cudagraphs=mode.spec=cudagraphs'"
      ;;
    dynamic)  # the seed's --run_multiple_resolutions with dynamic=true (7 x 7 shapes)
      run dynamic $COMMON bench.eager=false bench.cache_warmup=false bench.quality=false \
        --compiler-config '{"mode": "max-optimize:low-precision", "memory_format": "channels_last", "dynamic": true}' \
        --run_multiple_resolutions 1
      ;;
    sd35)
      run sd35 model=sd3.5-medium steps=28 bench.repeat=3 bench.cache_warmup=false \
        "bench.variants='max-speed+fa4=mode=max-speed attention=fa4'"
      ;;
    cache)  # issue 4: warm a cache, pack it, install it into an empty dir, verify (each a fresh process)
      for m in ${CACHE_MODES:-default max-speed}; do cache_flow "$m"; done
      ;;
    warmtrace)  # issue 4: warm a cache, then trace the warm start without and with SD3PLUGIN_KEEP_COORDESC=1
      local m=$SD3PLUGIN_CACHE_DIR/models/sd3-medium-float16 d=/root/cache-trace repo=$PWD
      mkdir -p "$OUT/warmtrace"; rm -rf "$d"
      [ -f "$m/model_index.json" ] || (cd /tmp && python3 -c "
from sd3plugin.config import compose; from sd3plugin.pipeline import model_path
print(model_path(compose(None, ['model=sd3-medium'])))")
      (cd /tmp && python3 -m sd3plugin.cli.cache warm --json --no-progress --cache-dir "$d" \
          --resolutions 1024x1024 model="$m" mode=${TRACE_MODE:-default} > "$OUT/warmtrace/warm.json" 2>&1
       python3 "$repo/scripts/warm_start_trace.py" "$OUT/warmtrace/trace.json" model="$m" \
          mode=${TRACE_MODE:-default} cache_dir="$d" 2>&1 | tail -3
       SD3PLUGIN_KEEP_COORDESC=1 python3 "$repo/scripts/warm_start_trace.py" "$OUT/warmtrace/trace_keep.json" \
          model="$m" mode=${TRACE_MODE:-default} cache_dir="$d" 2>&1 | tail -3)
      ;;
    quant)
      # bfloat16 for all: torchao's per-row fp8 takes bfloat16 weights; eager bf16 is the baseline.
      run quant $COMMON dtype=bfloat16 num_images=2 bench.cache_warmup=false \
        "bench.variants='fp8=mode=max-speed quant=fp8_e4m3_e4m3_dynamic; fp8_tensor=mode=max-speed quant=fp8_e4m3_e4m3_dynamic_per_tensor; int8=mode=max-speed quant=int8_dynamic'"
      ;;
    quantrest)  # the presets the first quant run did not reach (its time limit): fp8 weight-only, int8
      run quantrest $COMMON dtype=bfloat16 num_images=2 bench.cache_warmup=false \
        "bench.variants='fp8_weightonly=mode=max-speed quant=fp8_e4m3_e4m3_weightonly; int8=mode=max-speed quant=int8_dynamic'"
      ;;
    fp8act)  # issue 23: fused activation quantization kernels vs the separate passes, at SD3-medium's shapes
      mkdir -p "$OUT/fp8act"
      (cd /tmp && python3 "$OLDPWD/scripts/fp8_act_bench.py" --out "$OUT/h200-fp8-activation-quant.json" | tail -4)
      ;;
    fp8e2e)  # issue 23: fp8 preset with compiled VAE decoder and text encoders vs bf16 eager, one process
      run fp8e2e $COMMON dtype=bfloat16 num_images=1 bench.cache_warmup=false \
        "bench.variants='fp8+e2e=mode=max-speed quant=fp8_e4m3_e4m3_dynamic compile_vae=true compile_text_encoders=true'"
      [ -f "$OUT/fp8e2e/bench.json" ] && python3 scripts/fp8_summary.py "$OUT/fp8e2e/bench.json" \
        "$OUT/h200-sd3-medium-fp8-e2e.json"
      ;;
    fp8fused)  # issue 23: bf16 eager vs the fp8 preset vs the fp8 preset + fp8_fused_activation, one process
      RUN_LIMIT=${RUN_LIMIT:-400} run fp8fused $COMMON dtype=bfloat16 num_images=1 bench.cache_warmup=false \
        "bench.variants='fp8=mode=max-speed quant=fp8_e4m3_e4m3_dynamic; fp8+fused=mode=max-speed quant=fp8_e4m3_e4m3_dynamic fp8_fused_activation=true'"
      [ -f "$OUT/fp8fused/bench.json" ] && python3 scripts/fp8_summary.py "$OUT/fp8fused/bench.json" \
        "$OUT/h200-sd3-medium-fp8-fused-activation.json" fp8+fused fp8
      ;;
    e2e16)  # issue 23: the 16-bit max-speed preset with compiled VAE decoder and text encoders vs bf16 eager
      run e2e16 $COMMON dtype=bfloat16 num_images=1 bench.cache_warmup=false \
        "bench.variants='16bit+e2e=mode=max-speed compile_vae=true compile_text_encoders=true'"
      [ -f "$OUT/e2e16/bench.json" ] && python3 scripts/fp8_summary.py "$OUT/e2e16/bench.json" \
        "$OUT/h200-sd3-medium-16bit-e2e.json"
      ;;
    vae)  # end to end: compiled VAE decoder on top of the fastest transformer setting
      run vae $COMMON bench.cache_warmup=false bench.quality=false \
        "bench.variants='max-speed+fa4+vae=mode=max-speed attention=fa4 compile_vae=true'"
      ;;
    *) echo "unknown section $1 (env attn gelu profile fp8profile fp8fusedprofile fp8act fp8e2e fp8fused e2e16 attn8 attn8quant fa4 fa4quant fa3 speed dynamic sd35 cache warmtrace quant quantrest vae all)"; return 2 ;;
  esac
}

[ $# -eq 0 ] && set -- all
[ "$1" = all ] && set -- env attn speed dynamic sd35 cache quant
status=0
for s in "$@"; do section "$s" || status=1; done
exit $status
