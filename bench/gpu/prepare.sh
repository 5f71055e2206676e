#!/usr/bin/env bash
# Run HERE (not on the GPU machine), before a GPU session: puts in .whl/ (ignored by git, carried to the device)
#   - the wheels of bench/gpu/wheels.txt, for the device's Python 3.12 on manylinux x86-64;
#   - COMMIT, the commit the results will be recorded under (the device's copy has no .git).
# With --vllm it also fetches vLLM for the device's torch (see README.md, "vLLM"); without it, nothing large.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEST=${WHEELS_DIR:-.whl}
mkdir -p "$DEST"
download() {  # pip download for the device's interpreter and platform, no dependencies resolved here
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_39_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" "$@"
}
download -r bench/gpu/wheels.txt
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || commit="$commit+dirty"
echo "$commit" > "$DEST/COMMIT"
if [ "${1:-}" = "--vllm" ]; then  # vLLM for the device's torch and what it needs, in parts: README.md, "vLLM"
  "$PY" -m bench.gpu.carry "${VLLM:-vllm==0.22.0}" --dest .whl-vllm ${VLLM_SKIP:+--skip $VLLM_SKIP}
fi
size=$(du -sm "$DEST" | cut -f1)
echo "prepare.sh: $(ls "$DEST"/*.whl | wc -l) wheels, ${size} MiB in $DEST (carry it: it must stay under ~60 MiB a call); commit $commit"
