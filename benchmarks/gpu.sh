#!/usr/bin/env bash
# The GPU benchmarks in one command (<= 8 min on one H100/H200): linfjax's PreActResNet-18
# epoch against a PyTorch peer (fp32 b128, bf16 b512), MFU from XLA's cost analysis,
# lockstep against sequential training, the whole pipeline at full CIFAR size (extrapolated
# from measured epochs and NC steps), Neural Cleanse vmapped against a loop, the pruning
# sweep; one table of ratios at the end. Run from anywhere; arguments go to run_all.py
# (e.g. --tiny, which CI runs on CPU).
#
# BackdoorBench's BadNets row at full size, instead of the benchmarks:
#   bash benchmarks/gpu.sh --backdoorbench-row DATA_DIR [WORKDIR]
# DATA_DIR: the full CIFAR-10 (`python -m linfjax.fetch DATA_DIR`); WORKDIR: the run directory
# (default runs/backdoorbench_row under the current directory; rerunning resumes). It runs
# benchmarks/backdoorbench_row.py --run: configs/cifar_patch.py:backdoorbench with every defense
# of the row that linfjax has, then the table of BackdoorBench's C-Acc/ASR beside linfjax's
# (also in WORKDIR/backdoorbench_row.md). Its GPU time has NOT been measured: the run trains
# two PreActResNet-18s (backdoored, vanilla) for 100 epochs each on 50,000 images, then Neural
# Cleanse on both and the defenses, so expect at least 2 x 100 x 50,000 / R seconds, R being
# the fp32 b128 images/s that the benchmarks above report for linfjax on the same GPU (their
# `pipeline_full_size_*` lines extrapolate the whole pipeline): an estimate, not a figure.
set -euo pipefail
absolute() { [[ "$1" == /* ]] && echo "$1" || echo "$PWD/$1"; }  # Before the cd below.
if [[ "${1:-}" == "--backdoorbench-row" ]]; then
  if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "usage: benchmarks/gpu.sh --backdoorbench-row DATA_DIR [WORKDIR]" >&2
    exit 2
  fi
  data_dir=$(absolute "$2")
  workdir=$(absolute "${3:-runs/backdoorbench_row}")
  cd "$(dirname "$0")/.."
  exec "${PYTHON:-python}" benchmarks/backdoorbench_row.py --run --data_dir="$data_dir" \
      --workdir="$workdir"
fi
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/run_all.py --gpu "$@"
