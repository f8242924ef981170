#!/usr/bin/env bash
# CI for the nexfort backend (CPU): build .venv-nexfort/ if it is missing (scripts/nexfort-env.sh, which
# also applies `sd3plugin-cache doctor --fix`), print the doctor report, run the nexfort tests there,
# then the main package's fast tests on the same torch 2.4 / diffusers 0.36 stack.
#
#   scripts/ci-nexfort.sh                 # everything
#   NEXFORT_CI_MAIN_TESTS=0 scripts/ci-nexfort.sh   # only the nexfort-marked tests
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NEXFORT_VENV:-.venv-nexfort}"
PY="$VENV/bin/python"
start=$(date +%s)
if ! "$PY" -c "import importlib.metadata as m; [m.version(p) for p in ('nexfort', 'onediff', 'sd3plugin')]" \
        2>/dev/null; then
    scripts/nexfort-env.sh
else
    "$VENV/bin/sd3plugin-cache" doctor --fix | grep '^fix:' || true   # idempotent
fi
built=$(date +%s)
"$VENV/bin/sd3plugin-cache" doctor
# Every test marked nexfort (tests/nexfort: tiny pipeline through the hook, cold and warm processes,
# auto, undo, options; tests/test_cache_nexfort.py: warm/pack/install/verify of nexfort's cache).
"$PY" -m pytest -q -p no:cacheprovider --timeout=1200 -m nexfort tests
# The main package on the old stack, with nexfort switched off so backend=auto means inductor as the
# tests expect (the nexfort-marked tests cover auto=nexfort). NEXFORT_CI_MAIN_TESTS: subset (default,
# about 3.5 min), all (the whole suite, about 6.5 min), 0 (none).
MAIN_SUBSET="tests/test_config.py tests/test_attention.py tests/test_hook.py tests/test_doctor.py tests/test_backend_auto.py tests/test_compile.py tests/test_app.py tests/test_cache_warm.py"
case "${NEXFORT_CI_MAIN_TESTS:-subset}" in
    subset) SD3PLUGIN_DISABLE_NEXFORT=1 "$PY" -m pytest -q -p no:cacheprovider --timeout=900 $MAIN_SUBSET ;;
    all) SD3PLUGIN_DISABLE_NEXFORT=1 "$PY" -m pytest -q -p no:cacheprovider --timeout=900 tests \
            --ignore=tests/nexfort -m "not nexfort" ;;
    0) ;;
    *) echo "ci-nexfort: NEXFORT_CI_MAIN_TESTS must be subset, all or 0" >&2; exit 2 ;;
esac
echo "ci-nexfort: environment $(( built - start )) s, tests $(( $(date +%s) - built )) s"
