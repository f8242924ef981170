#!/usr/bin/env bash
# One 1024x1024 SD3-medium image (random weights, 28 steps, guidance 7) on 1 GPU and on 2 GPUs through xDiT with
# the same preset (docs/parallel.md): latency of each, the speed-up, and how far the 2-GPU image is from the
# 1-GPU one. For a machine with two GPUs (the nvidia-h200-x2 device kind), offline:
#
#   pip wheel --no-deps -w .whl .                                     # on the host: the current code
#   pip download --no-deps -d .whl-parallel xfuser==0.7.0 DistVAE==0.1.0 yunchang==0.6.4 einops==0.8.2 \
#       av==18.1.0 beautifulsoup4==4.15.0 soupsieve==4.1.4           # xDiT and its dependencies
#   OUT=/some/dir bash scripts/parallel_bench.sh [PRESET [MODE]]      # on the GPU machine (default: cfg2 default)
#
# Three runs of sd3plugin-run, each into $OUT/<run>/ (log.txt, report.json, image_00.png):
#   one      parallel=none, the plugin's whole one-GPU path (fused projections, its attention kernel)
#   one_same parallel=none with what the parallel preset drops also dropped (fuse_qkv=false, attention=sdpa...): the same
#            computation on one GPU, the reference for the image comparison
#   par      parallel=PRESET (sd3plugin-run starts the ranks with torch.distributed.run)
# then $OUT/parallel_bench.json: seconds and it/s of each run, speed-ups par vs one and vs one_same, image
# differences (max / mean absolute difference in 0..255, PSNR). RUN_LIMIT=seconds caps each run (default 420).
set -uo pipefail
OUT=${OUT:-$PWD/parallel-out}
PRESET=${1:-cfg2}
MODE=${2:-default}
export SD3PLUGIN_CACHE_DIR=${SD3PLUGIN_CACHE_DIR:-/root/sd3cache}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c 'import sd3plugin.conf' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .whl-parallel ] && ! python3 -c 'import xfuser' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-parallel \
      .whl-parallel/*.whl || exit 1
  export PYTHONPATH=/tmp/site-parallel${PYTHONPATH:+:$PYTHONPATH}
fi
(cd /tmp && python3 -c 'import torch, xfuser; print("torch", torch.__version__, "GPUs", torch.cuda.device_count(),
      "xfuser ok")') 2>&1 | tail -3 | tee "$OUT/env.txt"

COMMON="model=sd3-medium height=1024 width=1024 steps=28 guidance_scale=7.0 seed=0 mode=$MODE"
# What the preset drops, as overrides for the one-GPU reference (fuse_qkv=false, attention=sdpa, ...).
SAME=$(cd /tmp && python3 -c "
from sd3plugin.config import compose
from sd3plugin.config.parallel import adjustments
cfg = compose(None, '$COMMON parallel=$PRESET'.split())
same = {'attention': 'sdpa'}  # xDiT's processor runs its own attention: the reference runs torch's SDPA
same.update({a.key: str(a.value).lower() if isinstance(a.value, bool) else a.value for a in adjustments(cfg)})
print(' '.join(f'{k}={v}' for k, v in same.items()))
") || exit 1
echo "one_same drops: $SAME" | tee -a "$OUT/env.txt"

run() {  # run NAME ENV OVERRIDES...
  local name=$1 env=$2; shift 2
  local work=/tmp/sd3parallel/$name
  rm -rf "$work"; mkdir -p "$OUT/$name" "$work"
  echo "=== $name: $env sd3plugin-run $*" | tee "$OUT/$name/log.txt"
  local t0=$SECONDS
  (cd /tmp && env $env timeout ${RUN_LIMIT:-420} python3 -m sd3plugin.apps.run "$@" output_dir="$work" \
      hydra.run.dir="$work/hydra") >> "$OUT/$name/log.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s"
  cp "$work"/report.json "$work"/report.md "$work"/image_00.png "$OUT/$name/" 2>/dev/null
  [ $rc -ne 0 ] && tail -25 "$OUT/$name/log.txt"
  return 0
}

run one CUDA_VISIBLE_DEVICES=0 $COMMON parallel=none
run one_same CUDA_VISIBLE_DEVICES=0 $COMMON parallel=none $SAME
run par CUDA_VISIBLE_DEVICES=0,1 $COMMON parallel=$PRESET

python3 - "$OUT" "$PRESET" "$MODE" <<'PY'
import json, math, sys
from pathlib import Path

import numpy as np
from PIL import Image

out, preset, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
runs = {}
for name in ("one", "one_same", "par"):
    try:
        rep = json.loads((out / name / "report.json").read_text())
    except Exception as exc:
        runs[name] = {"error": f"no report.json: {exc}"}
        continue
    runs[name] = {k: rep.get(k) for k in ("e2e_seconds", "iterations_per_second", "warmup_seconds", "load_seconds",
                                           "peak_memory_gib", "parallel")}
    runs[name]["attention"] = (rep.get("optimization") or {}).get("attention")

def image(name):
    path = out / name / "image_00.png"
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) if path.is_file() else None

def compare(a, b):
    x, y = image(a), image(b)
    if x is None or y is None or x.shape != y.shape:
        return {"error": "an image is missing"}
    d = np.abs(x - y)
    mse = float((d ** 2).mean())
    return {"max_abs": float(d.max()), "mean_abs": round(float(d.mean()), 4),
            "psnr_db": None if mse == 0 else round(10 * math.log10(255 ** 2 / mse), 2), "identical": mse == 0}

def speedup(base, other):
    a, b = runs.get(base, {}).get("e2e_seconds"), runs.get(other, {}).get("e2e_seconds")
    return round(a / b, 3) if a and b else None

result = {"preset": preset, "mode": mode, "model": "sd3-medium", "resolution": "1024x1024", "steps": 28,
          "runs": runs, "speedup_vs_one": speedup("one", "par"), "speedup_vs_one_same": speedup("one_same", "par"),
          "image_par_vs_one_same": compare("par", "one_same"), "image_one_same_vs_one": compare("one_same", "one")}
(out / "parallel_bench.json").write_text(json.dumps(result, indent=2))
print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
for name, r in runs.items():
    print(name, {k: r.get(k) for k in ("e2e_seconds", "iterations_per_second", "error")})
PY
