#!/usr/bin/env bash
# coopnets set-up and entry points. Each command builds .venv/ on first use.
#   ./run.sh main   - the main job: cooperative training of coop_resnet18 on the embedded
#                     digits data (16 px, 10 epochs; a few minutes on 2 CPU cores), ending with the per-depth
#                     table; the run folder is runs/main-<timestamp>
#   ./run.sh test   - the test suite
#   ./run.sh env    - only build/refresh the virtual environment
#
# The virtual environment gets torch and torchvision from the package registry as one
# matching pair. The machine's pip config adds a local CPU-only torch wheel (find-links)
# and local package indexes; the registry's torchvision does not load against that torch
# ("operator torchvision::nms does not exist"). Setting PIP_FIND_LINKS and
# PIP_EXTRA_INDEX_URL to a blank (not empty: pip ignores empty variables) makes pip use
# the registry alone.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${COOPNETS_VENV:-.venv}"
PY="$VENV/bin/python"

ensure_env() {
  local stamp="$VENV/.coopnets-installed"
  local want
  want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  echo "[run.sh] building $VENV (torch + torchvision from the registry, as a pair)" >&2
  [ -x "$PY" ] || python3 -m venv "$VENV"
  PIP_FIND_LINKS=" " PIP_EXTRA_INDEX_URL=" " "$PY" -m pip install --upgrade --quiet pip
  PIP_FIND_LINKS=" " PIP_EXTRA_INDEX_URL=" " "$PY" -m pip install --quiet -e '.[test,export,serve]'
  "$PY" -c "import torch, torchvision, timm; print(f'[run.sh] torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}')" >&2
  echo "$want" > "$stamp"
}

cmd="${1:-main}"
shift || true
case "$cmd" in
  env)  ensure_env ;;
  main) ensure_env; exec "$VENV/bin/coopnets" train --model coop_resnet18 --dataset digits --method cooperative \
          --epochs 10 --img-size 16 --out "runs/main-$(date +%Y%m%d-%H%M%S)" "$@" ;;
  test) ensure_env; exec "$PY" -m pytest "$@" ;;
  *) echo "usage: ./run.sh {main|test|env} [args...]" >&2; exit 2 ;;
esac
