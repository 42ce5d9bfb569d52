#!/usr/bin/env bash
# Fetches, on a machine with network, the Python 3.12 x86-64 wheels that the GPU
# machine lacks into .whl/ (git-ignored through .git/info/exclude). That machine
# (no network) already has jax, flax, optax, orbax-checkpoint, sentencepiece,
# numpy, etils, pyarrow, psutil and tqdm; it lacks the data stack. protobuf comes
# along too: tensorflow-metadata's generated code needs a runtime >= 6.31.
#
#   bash experiments/gpu/fetch_wheels.sh          # then carry '.whl' to the GPU call
#
# The versions are the ones the CPU tests run with. --no-deps: each missing
# dependency is named here instead, so nothing the GPU image has is replaced.
set -euo pipefail
out=${1:-.whl}
mkdir -p "$out"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
wheels=(
  grain==0.2.18 array-record==0.8.6 tensorflow-datasets==4.9.10 ml-collections==1.1.0
  tensorboardX==2.6.5 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0
  dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser
  termcolor==3.3.0 toml==0.10.2 portpicker importlib-resources protobuf==7.36.2
)
for w in "${wheels[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --dest "$out" \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "$w"
done
# promise (imported by tensorflow-datasets) is published as source only: build its
# pure-Python wheel here.
python3 -m pip wheel -q --no-deps --wheel-dir "$out" promise==2.3
ls "$out"
du -sh "$out"
