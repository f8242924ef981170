#!/usr/bin/env bash
# Start-up benchmark of issue 14 (GPU machine): warm -> pack -> install into an empty dir -> verify (warm start
# with the precompiled blocks), the same without them (the inductor-cache path), verify --cold, plus import
# times. Writes one JSON per step and summary.json to $OUT.
#
#   # on the host: wheels of this checkout (no deps) for an offline GPU machine
#   pip wheel --no-deps -w .whl .
#   # on the GPU machine, from the source checkout, torch/diffusers/flash-attn-4 installed:
#   OUT=/tmp/out bash scripts/startup_bench.sh
#
# Environment: OUT (results, default ./startup-out), MODE (default max-speed), MODEL (default sd3-medium),
# RES (default 1024x1024), STEPS (default 28), SKIP_COLD=1 (no verify --cold), QUICK=1 (only the warm start with
# precompiled blocks, the inductor-cache path and the cold start), ROOT (work dirs, default /root).
# Disk vs page cache: the model folder is read once by warm (page cache warm afterwards); if
# /proc/sys/vm/drop_caches is writable, the script also runs one warm start after dropping the page cache
# (verify_warm_dropped.json); otherwise summary.json says it could not.
set -uo pipefail
OUT=${OUT:-$PWD/startup-out}
MODE=${MODE:-max-speed}
MODEL=${MODEL:-sd3-medium}
RES=${RES:-1024x1024}
STEPS=${STEPS:-28}
ROOT=${ROOT:-/root}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c 'import sd3plugin.conf' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null || {
  echo "error: scripts/startup_bench.sh measures on a CUDA GPU and torch sees none here (or does not import); run it on the GPU machine" >&2
  exit 2
}
ci=$ROOT/startup-ci serve=$ROOT/startup-serve arc=$ROOT/startup-$MODE.tar.zst
export SD3PLUGIN_CACHE_DIR=${SD3PLUGIN_CACHE_DIR:-$ROOT/sd3cache}   # random-weight models are built here once
rm -rf "$ci" "$serve" "$arc"
cache="python3 -m sd3plugin.cli.cache"
cd /tmp   # the checkout's sd3plugin/ must not shadow the installed package

step() {  # step NAME CMD...: run, keep stdout as $OUT/NAME.json, stderr as $OUT/NAME.log, time it
  local name=$1; shift
  local t0=$(date +%s.%N)
  "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  echo "$name: exit $rc, $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s" | tee -a "$OUT/steps.txt"
  [ $rc -ne 0 ] && tail -5 "$OUT/$name.log"
  return 0
}

# 1. import times (fresh interpreters): the package, the CLI start, the serving imports
for what in "import sd3plugin" "import sd3plugin, torch, diffusers" "from diffusers import StableDiffusion3Pipeline; import sd3plugin; sd3plugin.optimize"; do
  python3 -X importtime -c "$what" 2>> "$OUT/importtime.txt" >/dev/null
  echo "--- $what" >> "$OUT/importtime.txt"
done
python3 - "$OUT/importtime.txt" > "$OUT/imports.json" <<'EOF'
import json, sys
from sd3plugin.startup import parse_importtime
blocks, current = {}, []  # each statement's importtime lines end with its "--- statement" line
for line in open(sys.argv[1]):
    if line.startswith("--- "):
        blocks[line[4:].strip()] = parse_importtime("".join(current)); current = []
    else:
        current.append(line)
print(json.dumps(blocks, indent=1))
EOF
( t0=$(date +%s.%N); $cache --help >/dev/null; echo "{\"cli_help_seconds\": $(python3 -c "print(round($(date +%s.%N) - $t0, 3))")}" ) > "$OUT/cli_start.json"

# 2. the cache flow (model folder built once under $SD3PLUGIN_CACHE_DIR/models)
ovs="model=$MODEL mode=$MODE steps=$STEPS"
step warm $cache warm --json --no-progress --cache-dir "$ci" --resolutions "$RES" $ovs
step pack $cache pack --json --cache-dir "$ci" -o "$arc"
step install $cache install --json "$arc" --cache-dir "$serve"
folder=$(python3 -c "
from sd3plugin.config import compose; from sd3plugin.pipeline import model_path
print(model_path(compose(None, ['model=$MODEL'])))")
vovs="model=$folder mode=$MODE steps=$STEPS"
step verify_warm $cache verify --json --cache-dir "$serve" $vovs
[ -n "${QUICK:-}" ] || step verify_warm_again $cache verify --json --cache-dir "$serve" $vovs
SD3PLUGIN_PRECOMPILED=0 step verify_warm_inductor_path $cache verify --json --cache-dir "$serve" $vovs
[ -n "${QUICK:-}" ] || SD3PLUGIN_DIRECT_LOAD=0 step verify_warm_cpu_staging $cache verify --json --cache-dir "$serve" $vovs
dropped=false
if [ -z "${QUICK:-}" ] && [ -w /proc/sys/vm/drop_caches ]; then
  sync && echo 3 > /proc/sys/vm/drop_caches && dropped=true
  step verify_warm_dropped $cache verify --json --cache-dir "$serve" $vovs
fi
[ -n "${SKIP_COLD:-}" ] || step verify_cold $cache verify --json --cold --cache-dir "$serve" $vovs

# 3. summary: the start-up breakdown of each verify, side by side
python3 - "$OUT" "$dropped" > "$OUT/summary.json" <<'EOF'
import json, pathlib, sys
out, dropped = pathlib.Path(sys.argv[1]), sys.argv[2] == "true"
def load(name):
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
summary = {"page_cache_dropped_run": dropped, "imports": load("imports"), "cli_start": load("cli_start")}
warm = load("warm") or {}
summary["warm"] = {k: warm.get(k) for k in ("seconds", "blob_bytes", "precompiled", "shapes")}
pack = load("pack") or {}
summary["pack"] = {k: pack.get(k) for k in ("archive_bytes", "files")}
for name in ("verify_warm", "verify_warm_again", "verify_warm_inductor_path", "verify_warm_cpu_staging",
             "verify_warm_dropped", "verify_cold"):
    v = load(name)
    if v:
        summary[name] = {k: v.get(k) for k in ("exit_code", "time_to_first_image_seconds", "import_seconds",
                                               "load_seconds", "first_image_seconds", "fresh_compilations",
                                               "coordesc_tuning_benchmarks", "precompiled", "startup", "error")}
print(json.dumps(summary, indent=1, default=str))
EOF
echo "results in $OUT (summary.json)"
