#!/usr/bin/env bash
# The one prepared check for a lent single-GPU machine: GPT-J 6B's shape (random weights),
# bf16, DeepSpeed ZeRO-3 on one GPU (preset a100) with gradient checkpointing, as the
# training run builds it (dolly_ray.train.engine.build_engine). Prints pad vs pack useful tokens/s
# and MFU, and each strategy's peak GPU memory beside the memory plan's prediction; the
# last line is JSON. About 5 minutes; prepare with benchmarks/gpu/prepare.sh, then run from
# the repository root with .whl and .gpu_data carried.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed's op builder cannot parse arch suffixes such as 9.0a (Hopper): build its fused
# Adam for this GPU's plain compute capability.
export TORCH_CUDA_ARCH_LIST="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
python3 benchmarks/train_throughput.py --gptj-6b --gradient-checkpointing --engine deepspeed \
    --data "${DATA:-.gpu_data/alpaca_eval_davinci003.json}" --max-length 1024 --micro-batch-size 8 \
    --strategies pad,pack --tokens 65536 --warmup-steps 2 --peak-tflops "${PEAK_TFLOPS:-989}"
