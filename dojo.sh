#!/usr/bin/env bash
# ComfyUI-Dojo's one entry point for developers and CI.
#   ./dojo.sh demo [ARGS]   set up (if needed) and run the main job: a small CPU training run on sample_data/
#   ./dojo.sh test [ARGS]   set up (if needed) and run every test tier at the same time ($DOJO_TEST_JOBS at
#                           most): the engine tier and the integration tier in each ComfyUI tree found
#                           (COMFYUI_PATH, default ~/ComfyUI; COMFYUI_OLDEST_PATH, default ~/ComfyUI-0.8.0),
#                           each tier's output printed whole when it ends. Every tier runs even after a
#                           failure; one summary line per tier; the exit status is non-zero if any tier
#                           failed. ARGS go to pytest (test paths select the tiers they belong to). Under
#                           CI=true the run also fails unless the integration tier ran against the main
#                           target (ComfyUI $DOJO_MAIN_TARGET).
#   ./dojo.sh setup         only the set-up: a venv ($DOJO_VENV, default .venv) with torch 2.13.0 (CPU) first,
#                           then the pack and its test extra, then the first ComfyUI tree's requirements.txt
#                           (torch kept as installed) and, for each further tree, an overlay venv of the
#                           packages it pins differently ($DOJO_VENV/comfyui-trees/<version>; run that
#                           tree's tests with its bin/python)
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

# Install a ComfyUI tree's requirements.txt into the environment of a Python (the venv's, or a tree
# overlay's), keeping the installed torch: a constraints file pins it, and torchvision/torchaudio (which
# must match torch build for build) are handled apart.
comfy_requirements() {
  local tree="$1" py="$2" tmp
  [ -f "$tree/requirements.txt" ] || { echo "dojo.sh: $tree has no requirements.txt; nothing installed"; return 0; }
  tmp="$(mktemp -d)"
  "$py" - "$tree/requirements.txt" "$tmp" <<'EOF'
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
# torchvision / torchaudio, where the tree lists them: installed is not enough, they must import (a build
# for another torch does not).
listed = {Requirement(l.split("#", 1)[0].strip()).name.lower() for l in src.read_text().splitlines()
          if l.split("#", 1)[0].strip() and not l.strip().startswith("-")}
broken = []
for lib in ("torchvision", "torchaudio"):
    if lib in listed:
        try:
            __import__(lib)
        except Exception:
            broken.append(lib)
(out / "missing_libs").write_text(" ".join(broken))
EOF
  if [ -s "$tmp/missing" ]; then
    echo "dojo.sh: installing the requirements of ComfyUI $(tree_version "$tree") at $tree" \
         "into $(dirname "$(dirname "$py")") (torch kept)"
    quiet "$py" -m pip install -q -r "$tmp/requirements.txt" -c "$tmp/constraints.txt" || { rm -rf "$tmp"; return 1; }
  fi
  local lib missing_libs
  missing_libs="$(cat "$tmp/missing_libs")"
  # Requirements just installed may have changed what imports: look again.
  if [ -s "$tmp/missing" ] && [ -z "$missing_libs" ]; then
    for lib in torchvision torchaudio; do
      grep -qiE "^$lib([<>=~ ;]|$)" "$tree/requirements.txt" && ! "$py" -c "import $lib" 2>/dev/null \
        && missing_libs="$missing_libs $lib"
    done
  fi
  if [ -n "$missing_libs" ]; then
    if [ -x "$comfy_helper" ]; then
      # This machine's CPU torch has no matching torchvision/torchaudio build in the registry; the team's
      # helper installs what works here (and nothing else changes: the requirements are already in).
      PATH="$(dirname "$py"):$PATH" quiet "$comfy_helper" --dest "$tree" >/dev/null || true
    else
      quiet "$py" -m pip install -q $missing_libs -c "$tmp/constraints.txt" || true
    fi
    for lib in $missing_libs; do
      "$py" -c "import $lib" 2>/dev/null || echo "dojo.sh: warning: $lib does not import; install the build" \
        "matching torch $("$py" -c 'import torch; print(torch.__version__)') (ComfyUI needs torchvision; its audio" \
        "nodes need torchaudio)"
    done
  fi
  rm -rf "$tmp"
}

# The Python a tree's tier runs in, with the tree's requirements installed (its path goes to stdout, what
# pip says to stderr). The first tree (the main target when there is one) uses the venv itself. Each
# further tree gets an overlay venv, $venv/comfyui-trees/<version>: its own site-packages holds only what
# that tree pins differently (the frontend, templates and docs packages), and a .pth puts the venv's
# site-packages behind it, so torch and everything else are shared, nothing in the venv is swapped, and
# the tiers of different trees can run at the same time. (pip in an overlay installs the differing
# versions there and leaves the venv's alone: it never uninstalls outside its own prefix.)
tree_python() {
  local tree="$1" first="$2" dir site shared
  if [ "$first" = 1 ]; then
    dir="$venv"
  else
    dir="$venv/comfyui-trees/$(tree_version "$tree")"
    if [ ! -f "$dir/.dojo-overlay" ]; then
      rm -rf "$dir"
      # No pip of its own: the venv's pip (through the .pth) runs in the overlay and installs into it.
      "$venv/bin/python" -m venv --without-pip "$dir" >&2 || return 1
      site="$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
      shared="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
      echo "import site; site.addsitedir('$shared')" > "$site/_dojo_shared_venv.pth"
      touch "$dir/.dojo-overlay"
    fi
  fi
  comfy_requirements "$tree" "$dir/bin/python" >&2 \
    || echo "dojo.sh: installing the requirements of $tree failed; running its tier anyway" >&2
  echo "$dir/bin/python"
}

setup() {
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || die "cannot create a venv at $venv"
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  # torch first, pinned, so that nothing below can pull another (CUDA) build.
  python -c "import torch" 2>/dev/null || quiet pip install -q torch==2.13.0 || die "cannot install torch"
  # The pack (editable, from this checkout) and its test extra: again only when pyproject.toml or the
  # checkout changed since the last install into this venv (pip takes a while even with nothing to do).
  local stamp="$venv/.dojo-pack-installed" want
  want="$repo $(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    rm -f "$stamp"
    quiet pip install -q -e ".[test]" || die "cannot install the pack"
  fi
  local where
  where="$(python -c "import comfyui_dojo, torch, peft, diffusers, av, os; print(os.path.dirname(comfyui_dojo.__file__))")" \
    || die "the pack does not import"
  [ "$(echo "$where" | tail -1)" = "$repo" ] && echo "$want" >"$stamp"
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
summary=(); not_run=(); failed=0; ran_main_target=0
# The tiers, in summary order: name, tree ("" for none), Python, test paths (one a line).
tier_names=(); tier_trees=(); tier_pythons=(); tier_paths=(); tier_pids=(); tier_started=()

stop_tiers() {  # on Ctrl-C / TERM: stop the running tiers (SIGINT lets pytest run its finalizers), show their logs
  local pid i
  for pid in "${tier_pids[@]}"; do [ -n "$pid" ] && kill -INT "$pid" 2>/dev/null; done
  wait
  for ((i = 0; i < ${#tier_pids[@]}; i++)); do
    [ -n "${tier_pids[i]}" ] && { tier_header "$i"; cat "$reports/$i.log"; echo "== ${tier_names[$i]} tier stopped"; }
  done
}
trap 'stop_tiers; exit 130' INT TERM
trap 'rm -rf "$reports"' EXIT
# pytest for a tier. Tiers run as background jobs, which a script starts with SIGINT ignored; give it back
# so that a Ctrl-C (forwarded by stop_tiers) ends a tier the way it ends pytest in a terminal, finalizers
# (running servers, subprocesses) included.
# The __main__ guard: ranks spawned by multiprocessing import this main module again.
cat >"$reports/pytest_tier.py" <<'EOF'
import signal
import sys

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import pytest

    sys.exit(pytest.main())
EOF

add_tier() { tier_names+=("$1"); tier_trees+=("$2"); tier_pythons+=("$3"); tier_paths+=("$4"); }

tier_header() {
  local tree="${tier_trees[$1]}" version
  if [ -n "$tree" ]; then
    version="$(tree_version "$tree")"
    echo "== ${tier_names[$1]} tier: ComfyUI $version ($(tree_role "$version")) at $tree"
  else
    echo "== ${tier_names[$1]} tier (no ComfyUI)"
  fi
}

# Start tier I in the background: one pytest session in the tier's Python, its output into its own log
# (printed whole when it ends), its counts from tests/conftest.py's report file.
start_tier() {
  local i="$1" py="${tier_pythons[$1]}" tree="${tier_trees[$1]}" paths
  mapfile -t paths <<<"${tier_paths[$1]}"
  tier_started[i]=$(date +%s)
  (
    # The tier's Python first on PATH too: what the tests start as `python` is the same environment.
    export PATH="$(dirname "$py"):$PATH" DOJO_TIER_REPORT="$reports/$i.json"
    [ -n "$tree" ] && export COMFYUI_PATH="$tree"
    "$py" "$reports/pytest_tier.py" -q "${paths[@]}" "${options[@]}" >"$reports/$i.log" 2>&1 &
    echo $! >"$reports/$i.pid"
    wait $!
    rc=$?
    # The CPU seconds the tier used (pytest and every subprocess it waited for), a load-independent figure.
    awk -v t="$(getconf CLK_TCK 2>/dev/null || echo 100)" '{sub(/.*\) /, ""); printf "%d", ($14 + $15) / t}' \
      "/proc/$BASHPID/stat" >"$reports/$i.cpu" 2>/dev/null
    date +%s >"$reports/$i.end"
    echo "$rc" >"$reports/$i.rc"
  ) &
  while [ ! -s "$reports/$i.pid" ] && [ ! -f "$reports/$i.rc" ]; do sleep 0.1; done
  tier_pids[i]="$(cat "$reports/$i.pid" 2>/dev/null)"
  echo "== started $(tier_header "$i" | sed 's/^== //')"
}

# Tier I has ended: print its log whole and its summary line.
finish_tier() {
  local i="$1" tree="${tier_trees[$1]}" rc version="" counts status=ok where secs cpu
  rc="$(cat "$reports/$i.rc")"; secs=$(( $(cat "$reports/$i.end") - tier_started[i] ))
  cpu="$(cat "$reports/$i.cpu" 2>/dev/null)"; secs="$secs s${cpu:+, $cpu CPU-s}"
  tier_pids[i]=""
  tier_header "$i"
  cat "$reports/$i.log"
  counts="$("$venv/bin/python" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["passed"], r["failed"] + r["errors"], r["skipped"])' \
            "$reports/$i.json" 2>/dev/null)" || counts="0 ? 0"
  read -r n_pass n_fail n_skip <<<"$counts"
  # 5: nothing collected (e.g. a -k that selects no test of this tier), which is no failure.
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then status=FAILED; failed=1; fi
  where="(no ComfyUI)"
  if [ -n "$tree" ]; then version="$(tree_version "$tree")"; where="$tree, ComfyUI $version"; fi
  echo "== ${tier_names[$i]} tier ended: $status, $secs"
  summary[i]="$(printf '%-12s %-7s %s: %s passed, %s failed, %s skipped (pytest exit %s, %s)' \
                  "${tier_names[$i]}" "$status" "$where" "$n_pass" "$n_fail" "$n_skip" "$rc" "$secs")"
  if [ -n "$tree" ] && [ "$(tree_role "$version")" = "main target" ] && [ "${n_pass:-0}" -gt 0 ]; then
    ran_main_target=1
  fi
}

# Start the tiers added so far, $DOJO_TEST_JOBS at a time at most (default: all at once: each pytest runs
# one thread, and a tier often waits on a server or a subprocess, so more tiers than cores still pays).
next_tier=0; running_tiers=0
launch_tiers() {
  local jobs="${DOJO_TEST_JOBS:-0}"
  [ "$jobs" -ge 0 ] 2>/dev/null || jobs=0
  while [ "$next_tier" -lt ${#tier_names[@]} ] && { [ "$jobs" = 0 ] || [ "$running_tiers" -lt "$jobs" ]; }; do
    start_tier "$next_tier"; next_tier=$((next_tier + 1)); running_tiers=$((running_tiers + 1))
  done
}

# Wait for every tier, printing each one's log as it ends and starting queued ones as slots free up.
finish_tiers() {
  local i
  while [ "$next_tier" -lt ${#tier_names[@]} ] || [ "$running_tiers" -gt 0 ]; do
    for ((i = 0; i < next_tier; i++)); do
      if [ -n "${tier_pids[i]}" ] && [ -f "$reports/$i.rc" ]; then
        finish_tier "$i"; running_tiers=$((running_tiers - 1))
      fi
    done
    launch_tiers
    sleep 1
  done
  wait
}

run_tests() {
  split_args "$@"
  local trees=() tree py first=1
  if [ ${#engine_paths[@]} -gt 0 ]; then
    add_tier engine "" "$venv/bin/python" "$(printf '%s\n' "${engine_paths[@]}")"
  fi
  if [ ${#integration_paths[@]} -gt 0 ]; then
    while IFS= read -r tree; do [ -n "$tree" ] && trees+=("$tree"); done < <(comfy_trees)
    if [ ${#trees[@]} -eq 0 ]; then
      echo "== integration tier: no ComfyUI tree at ${COMFYUI_PATH:-$HOME/ComfyUI} or ${COMFYUI_OLDEST_PATH:-$HOME/ComfyUI-0.8.0}"
      not_run+=("integration  NOT RUN no ComfyUI tree found (set COMFYUI_PATH / COMFYUI_OLDEST_PATH)")
    fi
    for tree in "${trees[@]}"; do
      # Each tree's own requirements (trees pin different frontend packages). The first tree's go into the
      # venv itself, so nothing starts before they are in; further trees get overlays while tiers run.
      py="$(tree_python "$tree" "$first")" || { echo "dojo.sh: cannot make an environment for $tree" >&2; failed=1
        not_run+=("integration  FAILED  $tree: no environment for its requirements"); continue; }
      add_tier integration "$tree" "$py" "$(printf '%s\n' "${integration_paths[@]}")"
      first=0
      launch_tiers
    done
  fi
  launch_tiers
  finish_tiers
  echo "== summary"
  printf '%s\n' "${summary[@]}" "${not_run[@]}"
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
    first=1
    while IFS= read -r tree; do
      [ -n "$tree" ] || continue
      echo "dojo.sh: ComfyUI $(tree_version "$tree") at $tree runs in $(tree_python "$tree" "$first")"
      first=0
    done < <(comfy_trees) ;;
  demo)
    setup
    shift
    python -m comfyui_dojo.training.demo "$@" ;;
  test)
    setup
    shift
    run_tests "$@" ;;
  *)
    sed -n 2,16p "$0"; exit 2 ;;
esac
