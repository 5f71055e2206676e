#!/usr/bin/env bash
# The GPU kit, run on the device machine from the project root (bench/gpu/README.md says how):
#     bash bench/gpu/run.sh [--dry-run] install|test|kernels|ppo|rollout|all
# Each step fits one 10-minute device call and reuses what earlier ones left there (the installed wheels in
# /tmp/site, the compiled kernels). Each writes bench/results/<gpu>/<step>.{md,json} (device, date, commit,
# command) and copies them to $OUT, so they come back. `all` runs the steps in order, goes on past a failed
# one, and stops at nothing but a missing GPU.
# --dry-run: the same code paths on the CPU at tiny sizes, nothing installed, built or saved (CI runs it).
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
STEP=${1:-}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
[ -f .whl/COMMIT ] && export RLHF_ENGINE_COMMIT=$(cat .whl/COMMIT)
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
[ $DRY = 1 ] && export TRITON_INTERPRET=1

say() { echo "run.sh $STEP: $*"; }

if [ $DRY = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "run.sh: no GPU here (torch.cuda.is_available() is False): run it on the device machine, or with --dry-run"
  exit 2
fi
RES=bench/results/$("$PY" -c "from bench.harness import device_name; print(device_name('cuda'))" 2>/dev/null)

keep() {  # keep <file>...: results this step wrote, back through $OUT
  [ $DRY = 1 ] && return 0
  if [ -n "${OUT:-}" ]; then cp "$@" "$OUT"/; fi
}

step_install() {
  if [ $DRY = 1 ]; then
    say "[dry run] would install .whl/*.whl into /tmp/site and build kernels._C for sm_90 (TORCH_CUDA_ARCH_LIST=9.0)"
  else
    if ls .whl/*.whl >/dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { say "installing the carried wheels failed"; return 1; }
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
      say "no .whl/ carried: the CLI needs jsonargparse (bash bench/gpu/prepare.sh here, then carry .whl)"
    fi
    local t0=$SECONDS
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install --no-deps --no-build-isolation -e . \
      > /tmp/rlhf_engine_build.log 2>&1 || { tail -30 /tmp/rlhf_engine_build.log; say "pip install -e . failed"; return 1; }
    grep "rlhf-engine setup" /tmp/rlhf_engine_build.log
    export BUILD_SECONDS=$((SECONDS - t0))
  fi
  "$PY" -m bench.gpu.record install $([ $DRY = 1 ] && echo --dry-run) && keep "$RES"/install.md "$RES"/install.json
}

step_test() {
  # kernels on CUDA tensors against float64, and the engine's fused head and PPO step on the GPU
  local tests="tests/kernels/test_cuda.py tests/engine/test_fused_head.py"
  "$PY" -m pytest -q -p no:cacheprovider $tests -k "cuda" --junitxml=/tmp/rlhf_engine_tests.xml
  local rc=$?
  [ $rc = 5 ] && rc=0  # nothing selected (a dry run on a CPU-only torch): not a failure
  "$PY" -m bench.gpu.record test --junit /tmp/rlhf_engine_tests.xml $([ $DRY = 1 ] && echo --dry-run) \
    && keep "$RES"/tests.md "$RES"/tests.json
  return $rc
}

step_kernels() {
  if [ $DRY = 1 ]; then "$PY" -m bench --quick; else "$PY" -m bench --device cuda && keep "$RES"/kernels.md "$RES"/kernels.json; fi
}

step_ppo() {
  if [ $DRY = 1 ]; then
    "$PY" -m bench.bench_ppo --dry-run --backends auto,torch --estimators gae,grpo
  else
    "$PY" -m bench.bench_ppo --backends "${PPO_BACKENDS:-auto,torch,triton}" --size "${PPO_SIZE:-qwen2.5-0.5b}" \
      --estimators gae,grpo \
      && keep "$RES"/ppo*.md "$RES"/ppo*.json
  fi
}

step_rollout() {
  local why
  if ! why=$("$PY" -c "import vllm" 2>&1); then
    say "skipped: vLLM is not importable here ($(echo "$why" | tail -1)); carry it as bench/gpu/README.md ('vLLM') says"
    return 0
  fi
  if [ $DRY = 1 ]; then "$PY" -m bench.bench_rollout --quick; else
    "$PY" -m bench.bench_rollout --batch 64 --new-tokens 256 && keep "$RES"/rollout.md "$RES"/rollout.json
  fi
}

step_vllm-receive() {  # one carried part of vLLM and what it needs (.whl-vllm/part-NN), kept on the machine
  local part
  for part in .whl-vllm/part-*; do
    [ -f "$part/data" ] || continue
    mkdir -p /tmp/vllm-parts && cp "$part/data" "/tmp/vllm-parts/$(basename "$part")" && say "kept $(basename "$part")"
  done
  [ -f .whl-vllm/MANIFEST ] && cp .whl-vllm/MANIFEST /tmp/vllm-parts/
  ls /tmp/vllm-parts
}

step_vllm-install() {  # join the parts into wheels (MANIFEST: name and size, in order) and install them
  [ -f /tmp/vllm-parts/MANIFEST ] || { say "no parts received (run vllm-receive with each part first)"; return 1; }
  mkdir -p /tmp/vllm-wheels
  cat /tmp/vllm-parts/part-* | "$PY" -c "
import sys
src = sys.stdin.buffer
for line in open('/tmp/vllm-parts/MANIFEST'):
    name, size = line.split()
    with open('/tmp/vllm-wheels/' + name, 'wb') as f:
        f.write(src.read(int(size)))
" || return 1
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/vllm-wheels/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} && "$PY" -c "import vllm; print('vllm', vllm.__version__)"
}

case "$STEP" in
  install|test|kernels|ppo|rollout|vllm-receive|vllm-install)
    "step_$STEP"; rc=$?; say "exit $rc"; exit $rc ;;
  all)
    failed=""
    for s in install test kernels ppo rollout; do
      STEP=$s; "step_$s" || failed="$failed $s"
    done
    echo "run.sh all: ${failed:+failed:$failed}${failed:-every step passed}"
    [ -z "$failed" ] ;;
  *)
    echo "usage: bash bench/gpu/run.sh [--dry-run] install|test|kernels|ppo|rollout|all|vllm-receive|vllm-install"
    exit 2 ;;
esac
