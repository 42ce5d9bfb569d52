#!/usr/bin/env bash
# Downloads, on a machine with network, the Python 3.12 x86-64 wheels that the GPU
# machine lacks (it has jax, flax, optax, orbax, sentencepiece, transformers; not
# grain, array_record, tensorflow-datasets or ml-collections) into .wheels/, which
# `device.run(carry=['.wheels'])` takes along. Dependencies the GPU machine already
# has are skipped by pip there (--no-index --find-links .wheels).
#   bash experiments/benchmarks/fetch_gpu_wheels.sh && echo /.wheels/ >> .git/info/exclude
set -euo pipefail
out=${1:-.wheels}
mkdir -p "$out"
# --no-deps: resolving tensorflow-datasets' dependencies for another Python fails
# here; the ones the GPU image lacks are listed by name instead.
for pkg in grain array-record tensorflow-datasets ml-collections dm-tree immutabledict dill termcolor toml \
           simple-parsing googleapis-common-protos promise; do
  python3 -m pip download -q --no-deps --dest "$out" --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any "$pkg" || echo "could not fetch $pkg"
done
du -sh "$out"
