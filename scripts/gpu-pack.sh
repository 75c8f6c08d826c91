#!/usr/bin/env bash
# Builds the CUDA release here and packs what the GPU machine needs into .gpu/. The GPU machine
# has nvcc, cmake, python3 and torch but none of our Debian dependencies (Highway, fmt, CLI11,
# GoogleTest, OpenBLAS, ...) and no network, so we build on this Debian 12 machine (glibc 2.36,
# older than the GPU machine's) and carry binaries plus their shared libraries (<= 64 MiB, the
# most a run carries).
#
#   .gpu/bin/tqkv, .gpu/bin/test_cuda*   the CLI and the CUDA test binaries
#   .gpu/lib/                            their shared libraries except glibc's and the driver's
#   .gpu/lib/compat/                     libstdc++, libgcc_s, libgomp: used only when the GPU
#                                        machine's own are missing or too old (gpu-run.sh decides)
#   .gpu/tqkv                            the CLI with its libraries (what compare.py runs)
#   .gpu/scripts/, .gpu/bench/gpu/       the run scripts, so .gpu/ works without the checkout
#   .gpu/MANIFEST                        commit and build settings
#   .gpu/payload.tar.xz                  bin/ and lib/ compressed, when they would not fit as is
#
# Usage: scripts/gpu-pack.sh     then run scripts/gpu-run.sh there with .gpu carried.
# Env: CUDA_ARCH (90), TQKV_GPU_BUILD (build-gpu), TQKV_GPU_CUDA (ON; OFF only to test this
# script where the CUDA sources do not build yet), TQKV_GPU_CMAKE_ARGS (more -D options),
# TQKV_GPU_COMPRESS (1: always ship bin/ and lib/ as .gpu/payload.tar.xz; by default only when
# they would not fit). Keep .gpu/ and build-gpu/ out of git (they are
# in .gitignore).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${TQKV_GPU_BUILD:-$root/build-gpu}
out=$root/.gpu
arch=${CUDA_ARCH:-90}
cuda=${TQKV_GPU_CUDA:-ON}
limit=$((64 << 20))

die() {
  echo "gpu-pack: error: $*" >&2
  exit 1
}
# Last lines of a failed step's log, errors first, so the cause is on screen.
show_log() {
  grep -E "error|Error|FAILED|undefined reference" "$1" | head -40 >&2 || true
  echo "--- last lines of $1:" >&2
  tail -n 25 "$1" >&2
}

if [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi
if [ "$cuda" != OFF ]; then command -v nvcc >/dev/null || die "nvcc not found (PATH or /usr/local/cuda/bin)"; fi
for tool in cmake ninja ldd; do command -v "$tool" >/dev/null || die "$tool not found"; done

read -r -a extra <<<"${TQKV_GPU_CMAKE_ARGS:-}"
# OpenBLAS (the CLI's model code) is linked statically where Debian ships the archive: the
# shared library alone is 36 MB of the 64 MiB a run carries, while the linked-in part adds
# ~26 MB to the CLI only (the CUDA tests use no model code). TQKV_GPU_STATIC_BLAS=0: shared.
static_blas=/usr/lib/x86_64-linux-gnu/libopenblas.a
if [ "${TQKV_GPU_STATIC_BLAS:-1}" != 0 ] && [ -f "$static_blas" ]; then
  extra=(-DTQKV_OPENBLAS_LIB="$static_blas" -DCMAKE_CXX_STANDARD_LIBRARIES=-lgfortran "${extra[@]}")
fi
mkdir -p "$build"
echo "gpu-pack: configure $build (TQKV_CUDA=$cuda, sm_$arch)" >&2
if ! cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTQKV_CUDA="$cuda" \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" -DTQKV_BUILD_TESTS=ON -DTQKV_BUILD_CLI=ON -DTQKV_BUILD_BENCH=OFF \
  "${extra[@]}" >"$build/pack-configure.log" 2>&1; then
  show_log "$build/pack-configure.log"
  die "configure failed (log: $build/pack-configure.log)"
fi
if [ "$cuda" != OFF ] && ! grep -q "tqkv: CUDA backend ON" "$build/pack-configure.log"; then
  die "configured without the CUDA backend (see $build/pack-configure.log)"
fi

# Only the CLI and the CUDA tests: the CPU tests are not run there and take long to build.
mapfile -t tests < <(ninja -C "$build" -t targets all | sed -n 's/^\(test_cuda[A-Za-z0-9_]*\): phony$/\1/p' | sort -u)
echo "gpu-pack: build tqkv_cli ${tests[*]:-} ($(nproc) jobs)" >&2
if ! ninja -C "$build" tqkv_cli "${tests[@]}" >"$build/pack-build.log" 2>&1; then
  show_log "$build/pack-build.log"
  die "build failed (log: $build/pack-build.log)"
fi
[ "${#tests[@]}" -gt 0 ] || echo "gpu-pack: warning: no test_cuda* targets; packing the CLI only" >&2

cli=$build/tools/tqkv/tqkv
[ -x "$cli" ] || die "$cli was not built"
# The CLI's CUDA benchmark is compiled in only when the build found CUDA; a CLI without it
# would make every GPU run report "unsupported".
if [ "$cuda" != OFF ] && ! grep -qa "no usable CUDA device was found" "$cli"; then
  die "$cli has no CUDA benchmark (TQKV_CLI_CUDA not defined?)"
fi

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib/compat" "$out/bench/gpu"
cp "$cli" "$out/bin/tqkv"
for t in "${tests[@]}"; do
  bin=$(find "$build" -type f -name "$t" -perm -u+x | head -n 1)
  [ -n "$bin" ] || die "test binary $t not found under $build"
  cp "$bin" "$out/bin/$t"
done

# Shared libraries: everything ldd resolves (recursively) except what the GPU machine must
# provide itself: glibc (its loader is newer; ours must not mix with it) and the CUDA driver.
for bin in "$out"/bin/*; do
  ldd_out=$(ldd "$bin") || die "ldd $bin failed"
  if grep -q "not found" <<<"$ldd_out"; then die "$bin: $(grep "not found" <<<"$ldd_out" | head -n 3)"; fi
  while read -r name arrow path _; do
    if [ "$arrow" != "=>" ] || [ ! -f "$path" ]; then continue; fi
    case $name in
      linux-vdso* | ld-linux* | libc.so* | libm.so* | libmvec.so* | libpthread.so* | libdl.so* | librt.so* | \
        libutil.so* | libresolv.so* | libcuda.so* | libnvidia*) continue ;;
      libstdc++.so* | libgcc_s.so* | libgomp.so*) dest=$out/lib/compat ;;
      *) dest=$out/lib ;;
    esac
    [ -e "$dest/$name" ] || cp -L "$path" "$dest/$name"
  done <<<"$ldd_out"
done

cat >"$out/tqkv" <<'EOF'
#!/bin/sh
# The packed CLI with its libraries. Only this process gets them: torch in the calling shell
# must keep the system's libstdc++. gpu-run.sh sets TQKV_LD_PATH (compat libraries or not).
here=$(cd "$(dirname "$0")" && pwd)
LD_LIBRARY_PATH="${TQKV_LD_PATH:-$here/lib:$here/lib/compat}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/bin/tqkv" "$@"
EOF
chmod +x "$out/tqkv"
cp -r "$root/scripts" "$out/scripts"
cp "$root/bench/gpu/compare.py" "$root/bench/gpu/targets.py" "$out/bench/gpu/"
{
  echo "commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "built $(date -u +%Y-%m-%dT%H:%MZ) on $(uname -n): TQKV_CUDA=$cuda sm_$arch, $(nvcc --version 2>/dev/null | tail -n 1 || echo 'no nvcc')"
  echo "bin $(cd "$out/bin" && echo *); lib $(find "$out/lib" -type f -printf '%P ')"
} >"$out/MANIFEST"

# A run carries the checkout's files plus .gpu/ (64 MiB together). The CLI and each test embed
# the kernels' fatbins, so with several tests the folder outgrows that: then bin/ and lib/ travel
# as one xz archive (binaries shrink ~4x) that gpu-run.sh unpacks. TQKV_GPU_COMPRESS=1 forces it.
tree=$(git -C "$root" ls-files -z -co --exclude-standard | (cd "$root" && du -cb --files0-from=- 2>/dev/null) | tail -n 1 | cut -f1)
budget=$((limit - ${tree:-0} - (2 << 20)))
size=$(du -sb "$out" | cut -f1)
if [ "$size" -gt "$budget" ] || [ "${TQKV_GPU_COMPRESS:-0}" = 1 ]; then
  echo "gpu-pack: $((size >> 20)) MiB + $((${tree:-0} >> 20)) MiB of checkout; compressing bin/ and lib/" >&2
  tar -C "$out" -cf - bin lib | xz -T0 -6 >"$out/payload.tar.xz" || die "compressing $out failed"
  rm -rf "${out:?}/bin" "${out:?}/lib"
  size=$(du -sb "$out" | cut -f1)
  [ "$size" -le "$budget" ] || die "$out is $((size >> 20)) MiB even compressed; $((budget >> 20)) MiB fit beside the checkout"
fi
echo "gpu-pack: $out ($((size >> 20)) MiB): $(tr '\n' ';' <"$out/MANIFEST")"
