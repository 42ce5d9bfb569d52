#!/usr/bin/env bash
# The whole stack on one CUDA GPU with no network (issue 15), in one call of at
# most 9 minutes 20 s (the pipeline and the benchmark are capped at 4 minutes
# each). Run from the repository root with the wheels of
# experiments/gpu/fetch_wheels.sh in .whl/ (Python 3.12; the machine has jax,
# flax, optax, orbax and sentencepiece but not the data stack):
#
#   bash experiments/gpu/check.sh            # logs to $OUT (default /tmp/gpu_check)
#   PARTS='pipeline' PIPELINE_LIMIT=300 bash experiments/gpu/check.sh   # some parts only
#
# Parts, each under its own time limit, each logged to $OUT/<part>.log:
#   attention  every attention implementation against the numpy reference (cuDNN too)
#   pipeline   the tiny `make run` pipeline end to end, DPO / reward / GRPO at once
#   bench      peak bf16 matmul, the 1b step (MFU; remat dots and none), 1b at
#              8192 tokens, LoRA SFT on the 8b preset, and QLoRA (NF4 base) on it
#              (experiments.benchmarks.train_step --gpu)
#   rl         issue 13's RL step check on the 1b preset, if time is left
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo 'wheel install failed'; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "
import importlib.metadata as m, platform
print('python', platform.python_version(), '|', ', '.join(f'{p} {m.version(p)}' for p in (
    'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'tensorflow-datasets', 'array-record',
    'ml-collections', 'sentencepiece', 'numpy')))
import jax; print(jax.devices())"

PARTS=${PARTS:-attention pipeline bench rl}
part() {  # part NAME LIMIT_S COMMAND...: runs COMMAND under a time limit, prints the log's end
  local name=$1 limit=$2; shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s, at $(elapsed)s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-30}" "$OUT/$name.log"
  echo "=== $name: exit $rc after $(elapsed)s"
}

# On the GPU (conftest defaults to CPU), float32 matmuls at full precision (the default is TF32).
part attention 90 env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest -q -p no:cacheprovider tests/test_attention.py
# Several processes share the GPU: allocate on demand instead of 75% each.
TAIL=12 part pipeline "${PIPELINE_LIMIT:-240}" env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m experiments.pipeline --runs=/tmp/runs --parallel
TAIL=16 part bench 240 python3 -m experiments.benchmarks.train_step --gpu --steps=8
tail -n 40 /tmp/runs/*.log > "$OUT/stages.log" 2>/dev/null  # the parallel stages' own logs
left=$(( 560 - $(elapsed) ))
if [ "$left" -gt 90 ]; then
  TAIL=40 part rl "$left" python3 -m experiments.benchmarks.rl_gpu_check --size=1b --prompts=16 --n=8
fi
echo "total $(elapsed)s"
