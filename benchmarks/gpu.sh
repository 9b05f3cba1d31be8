#!/usr/bin/env bash
# The GPU figures of issue 19, as one short run on a machine with one CUDA GPU:
# the in-process engines on a ~1B model (tokens/s against the memory-bandwidth bound)
# and prefix reuse on that GPU. Prints everything; about 5-8 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python benchmarks/engine.py --hidden 2048 --layers 16 --heads 16 --rows 512 --arms acd
python benchmarks/prefix.py --hidden 2048 --layers 16 --device cuda --rows 512
