"""benchmarks/backdoorbench_row.py: the comparison table's cells from a written results.json,
its bad inputs (one line, exit 2, nothing written), and the run's command line (no training)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, write_cifar_dir

sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
import backdoorbench_row as row  # noqa: E402

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "backdoorbench_row.py")
# linfjax's registry as this test pins it: every defense of the row but i-BAU.
KNOWN = ("fine_tuning", "fine_pruning", "nc_unlearning", "anp", "clp", "nad", "linf")
HEADER = ("| defense | linfjax | BackdoorBench C-Acc | BackdoorBench ASR | linfjax CA | "
          "linfjax ASR | CA diff | ASR diff | note |")


def _entry(ca, asr):
  return {"r_star": 0, "CA": ca, "ASR_real": asr, "ASR_defender": 50.0, "dCA": 0.0,
          "dASR": 0.0, "DER": 50.0}


def _results(**synthetic):
  return {"seed": 0, "train": {"backdoored": {"CA": 92.0, "ASR": 94.5, "RA": 5.0},
                               "vanilla": {"CA": 93.0, "ASR": 1.0, "RA": 92.0}},
          "reverse": {"flagged": 0, "suspect": 0},
          "prune": {"synthetic": synthetic, "real": {"fine_pruning": _entry(1.0, 2.0)}}}


def _write_run(tmp_path, results, config=None):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "results.json").write_text(json.dumps(results))
  if config is not None:
    (run_dir / "config.json").write_text(json.dumps(config))
  return str(run_dir)


def test_table_cells_ours_theirs_differences_and_missing_rows(tmp_path):
  results = _results(fine_tuning=_entry(90.0, 2.0), fine_pruning=_entry(88.81, 60.13),
                     anp=_entry(84.17, 0.5), clp=_entry(91.0, 10.0), nad=_entry(89.0, 3.14),
                     linf=_entry(50.0, 50.0))
  lines = row.table(results, KNOWN)
  assert lines[0] == HEADER
  assert lines[2:] == [
      "| no defense | `train.backdoored` | 91.32 | 95.03 | 92.00 | 94.50 | +0.68 | -0.53 |  |",
      "| FT | `fine_tuning` | 89.96 | 1.48 | 90.00 | 2.00 | +0.04 | +0.52 |  |",
      "| FP | `fine_pruning` | 91.31 | 57.13 | 88.81 | 60.13 | -2.50 | +3.00 |  |",
      "| NC | `nc_unlearning` | 89.05 | 1.27 | - | - | - | - | not run: `nc_unlearning` is not "
      "in this run's prune.defenses |",
      "| ANP | `anp` | 84.17 | 0.73 | 84.17 | 0.50 | +0.00 | -0.23 |  |",
      "| CLP | `clp` | 90.07 | 77.56 | 91.00 | 10.00 | +0.93 | -67.56 |  |",
      "| NAD | `nad` | 89.87 | 2.14 | 89.00 | 3.14 | -0.87 | +1.00 |  |",
      "| i-BAU | `ibau` | 89.16 | 1.29 | - | - | - | - | not in linfjax (no `ibau` in "
      "linfjax.defenses.DEFENSES) |",
      "| ABL | - | 83.32 | 0.00 | - | - | - | - | not in linfjax; a training-time defense (it "
      "trains the model itself) |",
  ]
  # Once the registry has `ibau` and the run ran it, its row is filled like the others.
  results["prune"]["synthetic"]["ibau"] = _entry(89.16, 1.29)
  assert row.table(results, KNOWN + ("ibau",))[9] == (
      "| i-BAU | `ibau` | 89.16 | 1.29 | 89.16 | 1.29 | +0.00 | +0.00 |  |")


def test_rows_say_why_when_the_synthetic_source_was_skipped_or_nothing_flagged():
  skipped = _results()
  skipped["prune"]["synthetic"] = {"skipped": "no class reached the threshold"}
  lines = row.table(skipped, KNOWN)
  assert lines[3].endswith("| - | - | - | - | not run: the synthetic source was skipped (no class "
                           "reached the threshold) |")
  assert lines[2].startswith("| no defense | `train.backdoored` | 91.32 | 95.03 | 92.00 |")
  unflagged = _results(nc_unlearning=_entry(92.0, 94.5))
  unflagged["reverse"]["flagged"] = None
  assert row.table(unflagged, KNOWN)[5] == ("| NC | `nc_unlearning` | 89.05 | 1.27 | 92.00 | "
                                            "94.50 | +2.95 | +93.23 | Neural Cleanse flagged "
                                            "no class |")


def test_compare_names_a_run_that_differs_from_the_row_setting(tmp_path):
  config = {"protocol": "linfjax", "model": {"name": "preact_resnet18"}, "train": {"epochs": 10},
            "poison": {"rate": 0.1, "mode": "all_to_one", "target": 0},
            "trigger": {"kind": "patch"},
            "data": {"source": "cifar10_dir"}}
  run_dir = _write_run(tmp_path, _results(fine_tuning=_entry(90.0, 2.0)), config)
  report = row.compare(run_dir, KNOWN).splitlines()
  assert report[1] == ("This run differs from the row's setting: protocol='linfjax' (row: "
                       "'backdoorbench'); train.epochs=10 (row: 100).")
  assert report[3] == HEADER
  assert report[6] == "| FT | `fine_tuning` | 89.96 | 1.48 | 90.00 | 2.00 | +0.04 | +0.52 |  |"


def test_compare_command_prints_the_table(tmp_path):
  run_dir = _write_run(tmp_path, _results(fine_tuning=_entry(90.0, 2.0)))
  completed = subprocess.run([sys.executable, SCRIPT, f"--compare={run_dir}"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=120)
  assert completed.returncode == 0, completed.stderr[-2000:]
  lines = completed.stdout.splitlines()
  assert HEADER in lines
  assert "| FT | `fine_tuning` | 89.96 | 1.48 | 90.00 | 2.00 | +0.04 | +0.52 |  |" in lines
  assert not [line for line in lines if line.startswith("ratio ")]


def _bad(tmp_path, *args):
  completed = subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=120)
  assert completed.returncode == 2, (completed.stdout, completed.stderr)
  assert completed.stdout == ""
  assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
  return completed.stderr


def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path):
  workdir = tmp_path / "work"
  missing = tmp_path / "no_such_dir"
  error = _bad(tmp_path, "--run", f"--data_dir={missing}", f"--workdir={workdir}")
  assert f"--data_dir={missing}: no such directory" in error
  small = tmp_path / "small"
  write_cifar_dir(str(small))  # The layout, but 20 images a batch.
  error = _bad(tmp_path, "--run", f"--data_dir={small}", f"--workdir={workdir}")
  assert "not the full CIFAR-10" in error
  os.remove(small / "cifar-10-batches-py" / "test_batch")
  assert "no cifar-10-batches-py files test_batch" in _bad(
      tmp_path, "--run", f"--data_dir={small}", f"--workdir={workdir}")
  assert "results.json: not found" in _bad(tmp_path, f"--compare={tmp_path}")
  assert "exactly one of" in _bad(tmp_path, f"--compare={tmp_path}", "--run")
  assert not workdir.exists()
  assert sorted(os.listdir(tmp_path)) == ["small"]


def test_run_argv_names_only_registry_defenses_and_parses(monkeypatch):
  assert row.applicable(KNOWN) == ("fine_tuning", "fine_pruning", "nc_unlearning", "anp", "clp",
                                   "nad")
  assert row.applicable(("nad", "ibau", "clp")) == ("clp", "nad", "ibau")
  argv = row.run_argv("/data/cifar10", "/runs/bb", ("nad",), python="python")
  assert argv == ["python", "-m", "linfjax.main", "--config=configs/cifar_patch.py:backdoorbench",
                  "--workdir=/runs/bb", "--config.data.source=cifar10_dir",
                  "--config.data.path=/data/cifar10", "--config.prune.defenses=('nad',)"]
  # With linfjax's own registry, linfjax.main's parser accepts it and the config validates.
  from linfjax import config as config_lib, defenses, main
  argv = row.run_argv("/data/cifar10", "/runs/bb", row.registry())
  monkeypatch.chdir(REPO_ROOT)
  flag_argv = ["linfjax.main", *argv[3:]]
  values = main._flag_values(flag_argv)
  main._parse(values, flag_argv)
  config = values.config
  config_lib.validate(config)
  assert set(config.prune.defenses) <= set(defenses.DEFENSES)
  assert tuple(config.prune.defenses) == row.applicable(defenses.DEFENSES)
  assert (config.protocol, config.model.name, config.train.epochs, config.data.path) == (
      "backdoorbench", "preact_resnet18", 100, "/data/cifar10")
  assert row.setting_differences(config.to_dict()) == []


@pytest.mark.parametrize("config", [{}, {"protocol": "backdoorbench"}])
def test_setting_differences_name_every_missing_field(config):
  assert len(row.setting_differences(config)) == len(row.SETTING) - len(config)


def test_gpu_sh_flag_checks_the_data_dir_first(tmp_path):
  command = ["bash", os.path.join(REPO_ROOT, "benchmarks", "gpu.sh"), "--backdoorbench-row"]
  env = dict(os.environ, PYTHON=sys.executable)
  usage = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env)
  assert (usage.returncode, usage.stderr) == (
      2, "usage: benchmarks/gpu.sh --backdoorbench-row DATA_DIR [WORKDIR]\n")
  missing = subprocess.run([*command, "cifar"], cwd=tmp_path, capture_output=True, text=True,
                           env=env, timeout=120)
  assert missing.returncode == 2
  assert missing.stderr == (f"backdoorbench_row: --data_dir={tmp_path}/cifar: no such directory; "
                            f"download the full CIFAR-10 with `python -m linfjax.fetch "
                            f"{tmp_path}/cifar`\n")
  assert os.listdir(tmp_path) == []
