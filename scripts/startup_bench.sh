#!/usr/bin/env bash
# Start-up benchmark (GPU machine): warm -> pack -> install into an empty dir -> verify --baseline (our warm
# start and plain diffusers' eager start, page cache warm, then dropped) -> warm starts in a row, each
# counting autotuned kernels and coordinate-descent benchmarks. Writes one JSON per step and summary.json to
# $OUT. Sized for one 10-minute device call with SD3-medium (about 7-8 minutes; the random-weight model is
# built once under $SD3PLUGIN_CACHE_DIR); every step after install is skipped once BUDGET_S seconds have
# passed, so summary.json is always written.
#
#   # on the host: wheels of this checkout (no deps) for an offline GPU machine
#   pip wheel --no-deps -w .whl .
#   # on the GPU machine, from the source checkout, torch/diffusers/flash-attn-4 installed:
#   OUT=/tmp/out bash scripts/startup_bench.sh     # QUICK=1: baseline with the page cache warm, 3 warm starts
#
# Environment: OUT (results, default ./startup-out), MODE (default max-speed), MODEL (default sd3-medium),
# RES (default 1024x1024), STEPS (default 28), STREAK (warm starts in a row, default 10, counting the
# verify --baseline runs; the others use --steps 2: steps change no compiled graph), BUDGET_S (default 450),
# QUICK=1, FULL=1 (also import times, the inductor-cache path, CPU staging and verify --cold), ROOT (work
# dirs, default /root). Page cache: `verify --page-cache dropped` writes /proc/sys/vm/drop_caches where it can,
# else evicts the model's files with posix_fadvise(DONTNEED); its JSON says which (page_cache.how).
set -uo pipefail
OUT=${OUT:-$PWD/startup-out}
MODE=${MODE:-max-speed}
MODEL=${MODEL:-sd3-medium}
RES=${RES:-1024x1024}
STEPS=${STEPS:-28}
STREAK=${STREAK:-10}
BUDGET_S=${BUDGET_S:-450}
[ -n "${QUICK:-}" ] && STREAK=${QUICK_STREAK:-3}
ROOT=${ROOT:-/root}
T_BEGIN=$(date +%s)
in_budget() { [ $(( $(date +%s) - T_BEGIN )) -lt "$BUDGET_S" ]; }
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

# 1. FULL=1: import times (fresh interpreters): the package, the CLI start, the serving imports
if [ -n "${FULL:-}" ]; then
  for what in "import sd3plugin" "import sd3plugin, torch, diffusers" "from diffusers import StableDiffusion3Pipeline; import sd3plugin; sd3plugin.optimize"; do
    python3 -X importtime -c "$what" 2>> "$OUT/importtime.txt" >/dev/null
    echo "--- $what" >> "$OUT/importtime.txt"
  done
  python3 - "$OUT/importtime.txt" > "$OUT/imports.json" <<'PY'
import json, sys
from sd3plugin.startup import parse_importtime
blocks, current = {}, []  # each statement's importtime lines end with its "--- statement" line
for line in open(sys.argv[1]):
    if line.startswith("--- "):
        blocks[line[4:].strip()] = parse_importtime("".join(current)); current = []
    else:
        current.append(line)
print(json.dumps(blocks, indent=1))
PY
  ( t0=$(date +%s.%N); $cache --help >/dev/null; echo "{\"cli_help_seconds\": $(python3 -c "print(round($(date +%s.%N) - $t0, 3))")}" ) > "$OUT/cli_start.json"
fi

# 2. the cache flow (model folder built once under $SD3PLUGIN_CACHE_DIR/models)
ovs="model=$MODEL mode=$MODE steps=$STEPS"
step warm $cache warm --json --no-progress --cache-dir "$ci" --resolutions "$RES" $ovs
step pack $cache pack --json --cache-dir "$ci" -o "$arc"
step install $cache install --json "$arc" --cache-dir "$serve"
folder=$(python3 -c "
from sd3plugin.config import compose; from sd3plugin.pipeline import model_path
print(model_path(compose(None, ['model=$MODEL'])))")
vovs="model=$folder mode=$MODE steps=$STEPS"

# 3. ours vs plain diffusers (eager), page cache warm, then dropped: each is a warm start of the streak
started=0
if in_budget; then
  step verify_baseline_warm $cache verify --json --baseline --page-cache warm --cache-dir "$serve" $vovs
  started=1
fi
if [ -z "${QUICK:-}" ] && in_budget; then
  step verify_baseline_dropped $cache verify --json --baseline --page-cache dropped --cache-dir "$serve" $vovs
  started=2
fi
# 4. warm starts in a row (fresh processes): none may autotune or benchmark
while [ "$started" -lt "$STREAK" ] && in_budget; do
  started=$((started + 1))
  step "verify_streak_$started" $cache verify --json --steps 2 --cache-dir "$serve" $vovs
done
# 5. FULL=1: the inductor-cache path, CPU staging, the cold start
if [ -n "${FULL:-}" ]; then
  in_budget && SD3PLUGIN_PRECOMPILED=0 step verify_warm_inductor_path $cache verify --json --cache-dir "$serve" $vovs
  in_budget && SD3PLUGIN_DIRECT_LOAD=0 step verify_warm_cpu_staging $cache verify --json --cache-dir "$serve" $vovs
  in_budget && step verify_cold $cache verify --json --cold --cache-dir "$serve" $vovs
fi

# 6. summary: each verify's breakdown, the baseline comparison, the streak's counts
python3 - "$OUT" "$STREAK" "$(( $(date +%s) - T_BEGIN ))" > "$OUT/summary.json" <<'PY'
import json, pathlib, sys
out, streak, seconds = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def load(name):
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
summary = {"script_seconds": seconds, "imports": load("imports"), "cli_start": load("cli_start")}
warm = load("warm") or {}
summary["warm"] = {k: warm.get(k) for k in ("seconds", "blob_bytes", "precompiled", "shapes")}
pack = load("pack") or {}
summary["pack"] = {k: pack.get(k) for k in ("archive_bytes", "files")}
install = load("install") or {}
summary["install"] = {k: install.get(k) for k in ("seconds", "files")}
KEYS = ("exit_code", "time_to_first_image_seconds", "process_to_first_image_seconds", "import_seconds",
        "load_seconds", "first_image_seconds", "steady_image_seconds", "fresh_compilations", "autotuned_kernels",
        "coordesc_benchmarks", "coordesc_tuning_benchmarks", "phases", "other_seconds", "precompiled", "startup",
        "page_cache", "baseline_page_cache", "ratio", "package_seconds", "package_breakdown", "error")
runs = []
for name in ("verify_baseline_warm", "verify_baseline_dropped"):
    v = load(name)
    if v:
        summary[name] = {k: v.get(k) for k in KEYS}
        b = v.get("baseline") or {}
        summary[name]["baseline"] = {k: b.get(k) for k in (
            "process_to_first_image_seconds", "import_seconds", "load_seconds", "first_image_seconds",
            "steady_image_seconds", "phases", "other_seconds", "startup")}
        runs.append(v)
runs += [v for v in (load(f"verify_streak_{i}") for i in range(1, streak + 1)) if v]
summary["warm_starts"] = {
    "count": len(runs), "wanted": streak,
    "autotuned_kernels": [r.get("autotuned_kernels") for r in runs],
    "coordesc_benchmarks": [r.get("coordesc_benchmarks") for r in runs],
    "fresh_compilations": [r.get("fresh_compilations") for r in runs],
    "process_to_first_image_seconds": [r.get("process_to_first_image_seconds") for r in runs],
    "all_without_tuning": bool(runs) and all(not r.get("autotuned_kernels") and not r.get("coordesc_benchmarks")
                                             for r in runs)}
for name in ("verify_warm_inductor_path", "verify_warm_cpu_staging", "verify_cold"):
    v = load(name)
    if v:
        summary[name] = {k: v.get(k) for k in KEYS}
print(json.dumps(summary, indent=1, default=str))
PY
echo "results in $OUT (summary.json)"
