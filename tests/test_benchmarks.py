"""The benchmark scripts keep running: run_all.py's table and the GPU script, at tiny sizes."""

import math
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIO = re.compile(r"^ratio (\S+) (\S+) target (\S+)$", re.MULTILINE)


def _run(command, timeout=900, env=None):
  completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                             timeout=timeout,
                             env=dict(os.environ, PYTHONPATH=REPO, LINFJAX_COMPILE_CACHE="off",
                                      **(env or {})))
  assert completed.returncode == 0, (completed.stdout[-3000:], completed.stderr[-3000:])
  return completed.stdout


def _ratios(output: str) -> dict[str, float]:
  ratios = {name: float(value) for name, value, _ in RATIO.findall(output)}
  assert all(math.isfinite(v) and v > 0 for v in ratios.values()), ratios
  return ratios


def test_run_all_prints_machine_versions_and_one_table(tmp_path):
  output = _run([sys.executable, "benchmarks/run_all.py", "--only=prune,mfu", "--tiny"])
  assert re.search(r"^machine: .+, \d+ cores; GPU: none; load average", output, re.MULTILINE)
  assert "jax 0." in output and "orbax-checkpoint" in output
  assert "| benchmark | ratio | value | target | met |" in output
  ratios = _ratios(output.split("| benchmark | ratio |")[1])
  assert set(ratios) == {"prune_sweep_vs_passes", "mfu_cnn_float32_b16",
                         "mfu_preact_resnet18_float32_b16"}
  assert ratios["mfu_cnn_float32_b16"] < 1  # A share of the measured peak.


def test_gpu_script_runs_at_tiny_sizes_on_cpu():
  output = _run(["bash", "benchmarks/gpu.sh", "--tiny", "--only=gpu"], env={"PYTHON": sys.executable})
  ratios = _ratios(output.split("| benchmark | ratio |")[1])
  assert {"lockstep_vs_sequential_cnn_x2_float32", "lockstep_vs_sequential_cnn_x2_bfloat16",
          "lockstep_vs_sequential_preact_resnet18_x2_float32",
          "pipeline_full_size_fp32_b128_target_s_over_extrapolated_s",
          "pipeline_full_size_bf16_b512_target_s_over_extrapolated_s"} <= set(ratios)
  assert "extrapolated" in output
