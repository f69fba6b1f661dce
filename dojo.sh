#!/usr/bin/env bash
# ComfyUI-Dojo's one entry point for developers and CI.
#   ./dojo.sh demo [ARGS]   set up (if needed) and run the main job: a small CPU training run on sample_data/
#   ./dojo.sh test [ARGS]   set up (if needed) and run every test tier: the engine tier, then the integration
#                           tier in each ComfyUI tree found (COMFYUI_PATH, default ~/ComfyUI; COMFYUI_OLDEST_PATH,
#                           default ~/ComfyUI-0.8.0). Every tier runs even after a failure; one summary line
#                           per tier; the exit status is non-zero if any tier failed. ARGS go to pytest (test
#                           paths select the tiers they belong to). Under CI=true the run also fails unless
#                           the integration tier ran against the main target (ComfyUI $DOJO_MAIN_TARGET).
#   ./dojo.sh setup         only the set-up: a venv ($DOJO_VENV, default .venv) with torch 2.13.0 (CPU) first,
#                           then the pack and its test extra, then the main ComfyUI tree's requirements.txt
#                           (torch kept as installed; `test` installs each tree's before its tier)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
repo="$(pwd)"
venv="${DOJO_VENV:-$repo/.venv}"
main_target="${DOJO_MAIN_TARGET:-0.33}"   # the ComfyUI release series the pack is developed against
# The team's helper for one machine-specific gap (no torchvision/torchaudio build for this CPU torch).
comfy_helper="${DOJO_COMFYUI_HELPER:-$repo/../shared/comfyui/setup.sh}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # small models: a second thread slows them down here

die() { echo "dojo.sh: $*" >&2; exit 1; }

# Run a command, hiding one harmless pip warning this machine's pip configuration prints; keep its status.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; return "${PIPESTATUS[0]}"; }

# The ComfyUI version a tree reports (its comfyui_version.py), or "unknown".
tree_version() {
  sed -n 's/^__version__ *= *"\([^"]*\)".*/\1/p' "$1/comfyui_version.py" 2>/dev/null | head -1 | grep . || echo unknown
}

# The oldest ComfyUI the pack supports, from pyproject.toml's requires-comfyui (">=0.8.0").
oldest_supported() { sed -n 's/^requires-comfyui *= *">=\([0-9.]*\)".*/\1/p' pyproject.toml; }

# What a tree is to this project, told by the version it reports (not by its folder name).
tree_role() {
  local v="$1"
  if [ "$v" = "$(oldest_supported)" ]; then echo "oldest supported"
  elif [ "$v" = "$main_target" ] || [[ "$v" == "$main_target".* ]]; then echo "main target"
  else echo "other version"; fi
}

# The ComfyUI trees to test, main target first, each once (COMFYUI_PATH and COMFYUI_OLDEST_PATH may be
# given in either order or point at the same tree).
comfy_trees() {
  local seen="" t real role
  for t in "${COMFYUI_PATH:-$HOME/ComfyUI}" "${COMFYUI_OLDEST_PATH:-$HOME/ComfyUI-0.8.0}"; do
    [ -f "$t/main.py" ] && [ -d "$t/comfy" ] || continue
    real="$(cd "$t" && pwd -P)"
    case " $seen " in *" $real "*) continue ;; esac
    seen="$seen $real"
    role="$(tree_role "$(tree_version "$t")")"
    case "$role" in "main target") echo "0|$t" ;; "other version") echo "1|$t" ;; *) echo "2|$t" ;; esac
  done | sort -t'|' -k1,1n -s | cut -d'|' -f2-
}

# Install a ComfyUI tree's requirements.txt into the venv, keeping the installed torch: a constraints
# file pins it, and torchvision/torchaudio (which must match torch build for build) are handled apart.
comfy_requirements() {
  local tree="$1" tmp
  [ -f "$tree/requirements.txt" ] || { echo "dojo.sh: $tree has no requirements.txt; nothing installed"; return 0; }
  tmp="$(mktemp -d)"
  python - "$tree/requirements.txt" "$tmp" <<'EOF'
import sys
from importlib import metadata
from pathlib import Path
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

src, out = Path(sys.argv[1]), Path(sys.argv[2])
rest, missing = [], []
# requests: ComfyUI's server imports it, but not every release lists it.
for line in src.read_text().splitlines() + ["requests"]:
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):  # pip options (-r, --index-url) are not requirements
        continue
    req = Requirement(line)
    if req.name.lower() in ("torch", "torchvision", "torchaudio"):
        continue
    rest.append(line)
    try:
        ok = req.specifier.contains(metadata.version(req.name), prereleases=True)
    except metadata.PackageNotFoundError:
        ok = False
    if not ok:
        missing.append(line)
(out / "requirements.txt").write_text("\n".join(rest) + "\n")
(out / "constraints.txt").write_text(f"torch=={metadata.version('torch')}\n")
(out / "missing").write_text("\n".join(missing))
EOF
  if [ -s "$tmp/missing" ]; then
    echo "dojo.sh: installing the requirements of ComfyUI $(tree_version "$tree") at $tree (torch kept)"
    quiet pip install -q -r "$tmp/requirements.txt" -c "$tmp/constraints.txt" || { rm -rf "$tmp"; return 1; }
  fi
  local lib missing_libs=""
  for lib in torchvision torchaudio; do
    grep -qiE "^$lib([<>=~ ;]|$)" "$tree/requirements.txt" && ! python -c "import $lib" 2>/dev/null \
      && missing_libs="$missing_libs $lib"
  done
  if [ -n "$missing_libs" ]; then
    if [ -x "$comfy_helper" ]; then
      # This machine's CPU torch has no matching torchvision/torchaudio build in the registry; the team's
      # helper installs what works here (and nothing else changes: the requirements are already in).
      quiet "$comfy_helper" --dest "$tree" >/dev/null || true
    else
      quiet pip install -q $missing_libs -c "$tmp/constraints.txt" || true
    fi
    for lib in $missing_libs; do
      python -c "import $lib" 2>/dev/null || echo "dojo.sh: warning: $lib does not import; install the build" \
        "matching torch $(python -c 'import torch; print(torch.__version__)') (ComfyUI needs torchvision; its audio" \
        "nodes need torchaudio)"
    done
  fi
  rm -rf "$tmp"
}

setup() {
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || die "cannot create a venv at $venv"
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  # torch first, pinned, so that nothing below can pull another (CUDA) build.
  python -c "import torch" 2>/dev/null || quiet pip install -q torch==2.13.0 || die "cannot install torch"
  quiet pip install -q -e ".[test]" || die "cannot install the pack"
  python -c "import comfyui_dojo, torch, peft, diffusers, av" >/dev/null || die "the pack does not import"
}

# ---------------------------------------------------------------------------------------------- tests

# Split pytest's arguments into test paths (by tier) and everything else.
engine_paths=(); integration_paths=(); other_paths=(); options=()
split_args() {
  local a
  for a in "$@"; do
    if [[ "$a" != -* ]] && [ -e "${a%%::*}" ]; then
      case "$(cd "$(dirname "${a%%::*}")" && pwd -P)/$(basename "${a%%::*}")/" in
        "$repo"/tests/) engine_paths+=(tests/engine); integration_paths+=(tests/integration) ;;
        "$repo"/tests/engine/*) engine_paths+=("$a") ;;
        "$repo"/tests/integration/*) integration_paths+=("$a") ;;
        *) other_paths+=("$a") ;;
      esac
    else
      options+=("$a")
    fi
  done
  if [ ${#other_paths[@]} -gt 0 ]; then
    die "test paths must lie under tests/engine or tests/integration: ${other_paths[*]}"
  fi
  if [ ${#engine_paths[@]} -eq 0 ] && [ ${#integration_paths[@]} -eq 0 ]; then
    engine_paths=(tests/engine); integration_paths=(tests/integration)
  fi
}

reports="$(mktemp -d)"
trap 'rm -rf "$reports"' EXIT
summary=(); failed=0; ran_main_target=0

# run_tier NAME TREE PATHS...: one pytest session; its counts come from tests/conftest.py's report file.
run_tier() {
  local name="$1" tree="$2"; shift 2
  local report="$reports/$(( ${#summary[@]} + 1 )).json" version="" rc
  if [ -n "$tree" ]; then
    version="$(tree_version "$tree")"
    echo "== $name tier: ComfyUI $version ($(tree_role "$version")) at $tree"
    # Each tree's own requirements, just before its tier: trees pin different frontend packages.
    comfy_requirements "$tree" || echo "dojo.sh: installing the requirements of $tree failed; running the tier anyway"
    COMFYUI_PATH="$tree" DOJO_TIER_REPORT="$report" pytest -q "$@" "${options[@]}"
  else
    echo "== $name tier (no ComfyUI)"
    DOJO_TIER_REPORT="$report" pytest -q "$@" "${options[@]}"
  fi
  rc=$?
  local counts
  counts="$(python -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["passed"], r["failed"] + r["errors"], r["skipped"])' \
            "$report" 2>/dev/null)" || counts="0 ? 0"
  read -r n_pass n_fail n_skip <<<"$counts"
  # 5: nothing collected (e.g. a -k that selects no test of this tier), which is no failure.
  local status=ok
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then status=FAILED; failed=1; fi
  local where="${tree:-(no ComfyUI)}"
  [ -n "$tree" ] && where="$tree, ComfyUI $version"
  summary+=("$(printf '%-12s %-7s %s: %s passed, %s failed, %s skipped (pytest exit %s)' \
                "$name" "$status" "$where" "$n_pass" "$n_fail" "$n_skip" "$rc")")
  if [ -n "$tree" ] && [ "$(tree_role "$version")" = "main target" ] && [ "${n_pass:-0}" -gt 0 ]; then
    ran_main_target=1
  fi
}

run_tests() {
  split_args "$@"
  if [ ${#engine_paths[@]} -gt 0 ]; then
    run_tier engine "" "${engine_paths[@]}"
  fi
  if [ ${#integration_paths[@]} -gt 0 ]; then
    local trees=() tree
    while IFS= read -r tree; do [ -n "$tree" ] && trees+=("$tree"); done < <(comfy_trees)
    if [ ${#trees[@]} -eq 0 ]; then
      echo "== integration tier: no ComfyUI tree at ${COMFYUI_PATH:-$HOME/ComfyUI} or ${COMFYUI_OLDEST_PATH:-$HOME/ComfyUI-0.8.0}"
      summary+=("integration  NOT RUN no ComfyUI tree found (set COMFYUI_PATH / COMFYUI_OLDEST_PATH)")
    fi
    for tree in "${trees[@]}"; do
      run_tier integration "$tree" "${integration_paths[@]}"
    done
  fi
  echo "== summary"
  printf '%s\n' "${summary[@]}"
  if [ "${CI:-}" = "true" ] && [ "$ran_main_target" = 0 ]; then
    cat >&2 <<EOF
dojo.sh: CI needs the integration tier to run against ComfyUI $main_target (the main target), and it did not.
  Put a ComfyUI $main_target tree at ~/ComfyUI (or point COMFYUI_PATH at one), e.g.
    git clone --depth 1 --branch v$main_target.0 https://github.com/comfyanonymous/ComfyUI ~/ComfyUI
  and the oldest supported one ($(oldest_supported)) at ~/ComfyUI-$(oldest_supported) (or COMFYUI_OLDEST_PATH);
  ./dojo.sh test installs each tree's requirements into the venv itself.
EOF
    failed=1
  fi
  return "$failed"
}

case "${1:-}" in
  setup)
    setup
    tree="$(comfy_trees | head -1)"
    if [ -n "$tree" ]; then comfy_requirements "$tree" || die "cannot install the requirements of $tree"; fi ;;
  demo)
    setup
    shift
    python -m comfyui_dojo.training.demo "$@" ;;
  test)
    setup
    shift
    run_tests "$@" ;;
  *)
    sed -n 2,12p "$0"; exit 2 ;;
esac
