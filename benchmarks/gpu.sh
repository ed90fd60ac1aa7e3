#!/usr/bin/env bash
# The GPU benchmarks in one command (<= 8 min on one H100/H200): linfjax's PreActResNet-18
# epoch against a PyTorch peer (fp32 b128, bf16 b512), MFU from XLA's cost analysis,
# lockstep against sequential training, the whole pipeline at full CIFAR size (extrapolated
# from measured epochs and NC steps), Neural Cleanse vmapped against a loop, the pruning
# sweep; one table of ratios at the end. Run from anywhere; arguments go to run_all.py
# (e.g. --tiny, which CI runs on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/run_all.py --gpu "$@"
