#!/usr/bin/env bash
# Run here, before benchmarks/gpu/run.sh goes to a lent GPU machine (Python 3.12, no network,
# no Ray; torch, transformers and accelerate installed): builds the wheels it lacks into
# .whl/ and copies the AlpacaEval records into .gpu_data/. Both folders are git-ignored and
# travel with the run as `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl .gpu_data
mkdir -p .whl .gpu_data
PIP="${PYTHON:-python3} -m pip"
# DeepSpeed publishes a source archive: build the (pure Python) wheel of the locked version here.
deepspeed=$(grep -i '^deepspeed==' requirements.lock)
$PIP wheel --quiet --no-deps --no-build-isolation -w .whl "$deepspeed"
# What DeepSpeed needs that the machine's image lacks, as Python 3.12 manylinux wheels.
for package in hjson pydantic pydantic-core annotated-types typing-inspection; do
    pinned=$(grep -i -E "^${package//-/[-_]}==" requirements.lock || echo "$package")
    $PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pinned"
done
cp ../shared/data/alpaca_eval_davinci003.json .gpu_data/
ls -l .whl .gpu_data
