"""examples/paper_pipeline.py end to end: --tiny on a tiny CIFAR layout, and missing data."""

import os
import re
import subprocess
import sys

from conftest import REPO_ROOT, write_cifar_dir

EXAMPLE = os.path.join(REPO_ROOT, "examples", "paper_pipeline.py")
NUMBER = r"(-?\d+\.\d+)"
STEPS = ("data", "attack", "train", "reverse", "shifts", "prune")


def _run(*args, cwd):
  return subprocess.run([sys.executable, EXAMPLE, *args], cwd=cwd, capture_output=True,
                        text=True, timeout=600)


def test_tiny_paper_pipeline_prints_every_step_and_the_pruned_models(tmp_path):
  data = str(tmp_path / "cifar")
  write_cifar_dir(data, per_batch=60, num_test=60)  # 300 training, 60 test images.
  result = _run("--tiny", f"--data={data}", cwd=str(tmp_path))  # Not the repository root.
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  steps = [re.match(r"\[(\w+)\] ", line).group(1) for line in lines]
  assert sorted(set(steps), key=STEPS.index) == list(STEPS)

  assert "[data] 300 training images: 200 to train on, 100 held out as S; 60 test images, " \
         "10 classes" in lines
  assert any(line.endswith(": 20 of 200 training images poisoned") for line in lines)
  trained = {}
  for kind in ("backdoored", "vanilla"):
    (match,) = [m for m in map(re.compile(rf"\[train\] {kind}: CA {NUMBER} ASR {NUMBER} RA "
                                          rf"{NUMBER} \(\d+ s\)$").match, lines) if m]
    trained[kind] = [float(v) for v in match.groups()]
    assert all(0.0 <= v <= 100.0 for v in trained[kind])
  assert sum(line.startswith("[reverse] ") for line in lines) == 2
  shifts = [line for line in lines if line.startswith("[shifts] ")]
  assert len(shifts) in (2, 4)  # Both models, the real trigger and (if found) the synthetic.
  for line in shifts:
    assert re.search(rf"linf z {NUMBER} rel {NUMBER}; l2 z {NUMBER} rel {NUMBER}; l1 z "
                     rf"{NUMBER} rel {NUMBER}$", line), line

  pruned = {}
  for norm in ("linf", "l2", "l1"):
    (match,) = [m for m in map(re.compile(
        rf"\[prune\] {norm}: r\* = (\d+) of (\d+) neurons; CA {NUMBER} -> {NUMBER}, ASR "
        rf"{NUMBER} -> {NUMBER}$").match, lines) if m]
    r_star, neurons = int(match.group(1)), int(match.group(2))
    ca_before, ca_after, asr_before, asr_after = (float(v) for v in match.groups()[2:])
    assert neurons == 16 and 0 <= r_star <= neurons  # conv3_2 of the 1/8-width CNN.
    assert [ca_before, asr_before] == trained["backdoored"][:2]
    assert 0.0 <= ca_after <= 100.0 and 0.0 <= asr_after <= 100.0
    pruned[norm] = r_star
  assert len(pruned) == 3


def test_missing_data_is_one_line_naming_fetch_and_the_flag(tmp_path):
  result = _run(f"--data={tmp_path / 'absent'}", cwd=str(tmp_path))
  assert result.returncode == 2
  assert result.stdout == ""
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith(f"error: no CIFAR-10 subset at {tmp_path / 'absent'}")
  assert "python -m linfjax.fetch DIR" in line and "--data=DIR/cifar10-subset" in line
