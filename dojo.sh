#!/usr/bin/env bash
# ComfyUI-Dojo's one entry point for developers and CI.
#   ./dojo.sh demo   set up (if needed) and run the main job: a small CPU training run on sample_data/
#   ./dojo.sh test   set up (if needed) and run the tests: engine tier, then the integration tier in each
#                    ComfyUI tree found (COMFYUI_PATH, default ~/ComfyUI; COMFYUI_OLDEST_PATH, default
#                    ~/ComfyUI-0.8.0)
#   ./dojo.sh setup  only the set-up: a venv in .venv with torch 2.13.0 (CPU) first, then the pack and its
#                    test extra, then the requirements of the ComfyUI tree at COMFYUI_PATH if there is one
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
repo="$(pwd)"
venv="${DOJO_VENV:-$repo/.venv}"
comfy_main="${COMFYUI_PATH:-$HOME/ComfyUI}"
comfy_oldest="${COMFYUI_OLDEST_PATH:-$HOME/ComfyUI-0.8.0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # small models: a second thread slows them down here

# Run a command, hiding one harmless pip warning this machine's pip configuration prints; keep its status.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; return "${PIPESTATUS[0]}"; }

setup() {
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  # torch first, pinned, so that nothing below can pull another (CUDA) build.
  python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
  quiet pip install -q -e ".[test]"
  python -c "import comfyui_dojo, torch, peft, diffusers, av" >/dev/null
  if [ -f "$comfy_main/main.py" ] && [ -x "$repo/../shared/comfyui/setup.sh" ]; then
    quiet "$repo/../shared/comfyui/setup.sh" --dest "$comfy_main"
  fi
}

case "${1:-}" in
  setup)
    setup ;;
  demo)
    setup
    shift
    python -m comfyui_dojo.training.demo "$@" ;;
  test)
    setup
    shift
    echo "== engine tier + integration tier (ComfyUI at $comfy_main)"
    COMFYUI_PATH="$comfy_main" pytest -q tests "$@"
    if [ -f "$comfy_oldest/main.py" ]; then
      echo "== integration tier against the oldest supported ComfyUI ($comfy_oldest)"
      COMFYUI_PATH="$comfy_oldest" pytest -q tests/integration "$@"
    else
      echo "== no oldest-supported ComfyUI at $comfy_oldest (set COMFYUI_OLDEST_PATH to test it too)"
    fi ;;
  *)
    sed -n 2,9p "$0"; exit 2 ;;
esac
