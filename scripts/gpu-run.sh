#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root with .gpu/ (scripts/gpu-pack.sh) carried:
# the CUDA test binaries, optional compute-sanitizer passes, then bench/gpu/compare.py (tqkv vs
# torch SDPA). Console output stays short (a remote run returns only the last 12000 characters);
# full logs and JSON go to $OUT when it is set.
#
# Env:
#   OUT               folder for logs and JSON (default: a temporary folder, named at the end)
#   TESTS=0           skip the test binaries; GTEST_FILTER narrows them (gtest reads it itself)
#   SANITIZE_FILTER   gtest filter for compute-sanitizer runs (unset: no sanitizer runs); keep it
#                     small, memcheck is ~10-100x slower
#   SANITIZE_TOOLS    sanitizer tools (default "memcheck racecheck")
#   COMPARE=0         skip compare.py; COMPARE_ARGS: its extra arguments (e.g. "--quick")
# Exit status: non-zero when any step failed (every step runs regardless).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ "$(basename "$here")" = .gpu ]; then gpu=$here; root=$(dirname "$here"); else root=$here; gpu=$here/.gpu; fi
if [ ! -d "$gpu/bin" ] && [ -f "$gpu/payload.tar.xz" ]; then
  # gpu-pack.sh compressed bin/ and lib/ to fit a run's 64 MiB; python's tarfile if there is no xz.
  tar -C "$gpu" -xJf "$gpu/payload.tar.xz" 2>/dev/null ||
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$gpu/payload.tar.xz" "$gpu" ||
    { echo "gpu-run: cannot unpack $gpu/payload.tar.xz" >&2; exit 2; }
fi
[ -d "$gpu/bin" ] || { echo "gpu-run: $gpu/bin missing: run scripts/gpu-pack.sh on the build machine and carry .gpu" >&2; exit 2; }
logs=${OUT:-$(mktemp -d)}
mkdir -p "$logs"
failed=()

echo "== $(head -n 1 "$gpu/MANIFEST" 2>/dev/null || echo 'no MANIFEST')"
nvidia-smi -L || failed+=(nvidia-smi)
nvidia-smi --query-gpu=driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>/dev/null

# Packed libraries for our binaries only (python/torch keep the system's). Debian 12's libstdc++,
# libgcc_s and libgomp are used only if the system's are missing or too old for our binaries.
export TQKV_LD_PATH=$gpu/lib
if ! LD_LIBRARY_PATH=$TQKV_LD_PATH "$gpu/bin/tqkv" --version >/dev/null 2>&1; then
  TQKV_LD_PATH=$gpu/lib:$gpu/lib/compat
  echo "gpu-run: using the packed libstdc++/libgcc_s/libgomp"
fi
run_bin() { LD_LIBRARY_PATH=$TQKV_LD_PATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$@"; }
echo "tqkv $(run_bin "$gpu/bin/tqkv" --version 2>&1)"

# Prints a binary's pass/fail line and, on failure, the end of its log.
report() {
  local name=$1 rc=$2 log=$3 secs=$4
  if [ "$rc" -eq 0 ]; then
    echo "PASS $name (${secs}s) $(grep -E '^\[  PASSED  \]' "$log" | tail -n 1)"
  else
    echo "FAIL $name rc=$rc (${secs}s), log $log:"
    grep -E '^\[  FAILED  \]|Failure|ERROR SUMMARY|Error:|error:' "$log" | head -n 25
    tail -n 8 "$log"
    failed+=("$name")
  fi
}

shopt -s nullglob
tests=("$gpu"/bin/test_cuda*)
if [ "${TESTS:-1}" != 0 ]; then
  [ "${#tests[@]}" -gt 0 ] || echo "gpu-run: no test_cuda* binaries in $gpu/bin"
  for t in "${tests[@]}"; do
    name=$(basename "$t")
    start=$SECONDS
    run_bin "$t" --gtest_brief=1 >"$logs/$name.log" 2>&1
    report "$name" $? "$logs/$name.log" $((SECONDS - start))
    # The attention parity test again with each 4-bit kernel forced (pick() chooses otherwise).
    if [ "$name" = test_cuda_attention ]; then
      for kernel in tile lut; do
        start=$SECONDS
        TQKV_CUDA_KERNEL=$kernel run_bin "$t" --gtest_brief=1 >"$logs/$name.$kernel.log" 2>&1
        report "$name ($kernel kernel)" $? "$logs/$name.$kernel.log" $((SECONDS - start))
      done
    fi
  done
fi

if [ -n "${SANITIZE_FILTER:-}" ]; then
  san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [ ! -x "$san" ]; then
    echo "gpu-run: compute-sanitizer not found"
    failed+=(compute-sanitizer)
  else
    for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
      for t in "${tests[@]}"; do
        name="$tool:$(basename "$t")"
        # A binary with no test under the filter makes no CUDA call, which compute-sanitizer
        # reports as an error: skip it.
        if ! run_bin "$t" --gtest_list_tests --gtest_filter="$SANITIZE_FILTER" | grep -q '^  '; then
          echo "SKIP $name (no test matches SANITIZE_FILTER)"
          continue
        fi
        log="$logs/$tool.$(basename "$t").log"
        start=$SECONDS
        # API errors are not reported: every call of the library is checked already, and
        # test_cuda_robust makes failing calls on purpose (an out-of-memory cudaMalloc).
        run_bin "$san" --tool "$tool" --error-exitcode 99 --print-limit 20 --report-api-errors no \
          "$t" --gtest_brief=1 --gtest_filter="$SANITIZE_FILTER" >"$log" 2>&1
        report "$name" $? "$log" $((SECONDS - start))
        grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" "$log" | tail -n 1
      done
    done
  fi
fi

if [ "${COMPARE:-1}" != 0 ]; then
  script=$root/bench/gpu/compare.py
  [ -f "$script" ] || script=$gpu/bench/gpu/compare.py
  start=$SECONDS
  # shellcheck disable=SC2086  # COMPARE_ARGS is a list of arguments
  python3 "$script" --tqkv "$gpu/tqkv" --json "$logs/compare.json" ${COMPARE_ARGS:-} \
    >"$logs/compare.txt" 2>"$logs/compare.err"
  rc=$?
  cat "$logs/compare.txt"
  if [ "$rc" -ne 0 ]; then
    echo "FAIL compare.py rc=$rc:"
    tail -n 15 "$logs/compare.err"
    failed+=(compare)
  else
    echo "compare.py: $((SECONDS - start))s, JSON $logs/compare.json"
  fi
fi

echo "== logs in $logs"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "== FAILED: ${failed[*]}"
  exit 1
fi
echo "== all passed"
