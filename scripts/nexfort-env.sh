#!/usr/bin/env bash
# Build the nexfort environment (the torch 2.4 stack nexfort 0.1.dev330 needs) in .venv-nexfort/.
#
#   scripts/nexfort-env.sh            # build (or update) .venv-nexfort/ and repair nexfort's layout
#   NEXFORT_VENV=/path scripts/nexfort-env.sh
#
# Pins (see REFERENCE.md section 3 and docs/onediff-users.md): Python 3.11, torch 2.4.0 from PyPI (the
# +cu121 build: nexfort's import insists on it), triton 3.0.0, nexfort 0.1.dev330, onediff/onediffx 1.2.0,
# diffusers 0.36.0 (the newest that imports SD3 on torch 2.4), transformers 4.57.x, huggingface-hub 0.36.x.
# Downloads stay inside the venv folder (pip cache under $VENV/.pip-cache), nothing is written elsewhere.
# Afterwards `sd3plugin-cache doctor --fix` moves nexfort's misplaced extension modules (onediff#1189).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NEXFORT_VENV:-.venv-nexfort}"
PY="${NEXFORT_PYTHON:-python3.11}"
if ! command -v "$PY" >/dev/null; then
    echo "nexfort-env: $PY not found; nexfort needs CPython 3.8-3.12 (set NEXFORT_PYTHON=/path/to/python3.11)" >&2
    exit 2
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
export PIP_CACHE_DIR="$PWD/$VENV/.pip-cache"
constraints="$VENV/constraints.txt"
cat > "$constraints" <<'PINS'
torch==2.4.0
triton==3.0.0
nexfort==0.1.dev330
onediff==1.2.0
onediffx==1.2.0
diffusers==0.36.0
transformers>=4.57,<4.58
huggingface-hub>=0.36,<0.37
numpy<2
PINS
"$VENV/bin/python" -m pip install -q --upgrade pip
# One resolver run over everything, so nothing later replaces torch (plain `pip install nexfort` would).
# PIP_CONSTRAINT replaces any global pip constraint file (e.g. a torch cap of the host).
PIP_CONSTRAINT="$constraints" "$VENV/bin/python" -m pip install -q \
    torch==2.4.0 triton==3.0.0 -e ".[nexfort,test]"
"$VENV/bin/sd3plugin-cache" doctor --fix
echo "nexfort-env: $VENV ready in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
