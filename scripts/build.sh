#!/usr/bin/env bash
# Configures (once) and builds one CMake preset. Usage: scripts/build.sh [preset]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
preset=${1:-release}
"$root/scripts/install-deps.sh"
cd "$root"
if [ ! -f "build/$preset/build.ninja" ]; then
  cmake --preset "$preset" >&2
fi
jobs=$(nproc 2>/dev/null || echo 2)
cmake --build --preset "$preset" -j "$jobs" >&2
