"""The defense table: a Markdown row per group of a grid, mean ± sd of each defense."""

import os
import subprocess
import sys

import pytest

from linfjax.reports import defense_table, grid_report
from test_grid_report import REPO_ROOT, _grid, _results


@pytest.fixture
def grid_dir(tmp_path):
  root = str(tmp_path / "grid")
  _grid(root, [("trigger", ["patch", "blend"]), ("seed", [0, 1])], [
      ({"trigger": "patch", "seed": 0}, _results(0, 60.0, 90.0)),
      ({"trigger": "patch", "seed": 1}, _results(1, 62.0, 94.0, flagged=None)),
      ({"trigger": "blend", "seed": 0}, _results(0, 50.0, 80.0)),
      ({"trigger": "blend", "seed": 1}, None)])
  grid_report.write_grid_report(root)
  return root


def test_rows_are_mean_and_sd_over_finished_runs(grid_dir):
  table = defense_table.markdown(defense_table.read_aggregates(grid_dir)).splitlines()
  assert table[0] == ("| trigger | runs | CA before | ASR before | flagged | linf | l1 |")
  assert table[1] == "|" + " --- |" * 7
  # patch: CA 60, 62 -> 61.0 ± 1.4; ASR 90, 94 -> 92.0 ± 2.8; linf ASR 9, 9.4 at CA 59, 61.
  assert table[2] == ("| patch | 2 | 61.0 ± 1.4 | 92.0 ± 2.8 | 0: 1, null: 1 | "
                      "9.2 ± 0.3 (60.0 ± 1.4) | 46.0 ± 1.4 (59.0 ± 1.4) |")
  # blend: one finished run, so a mean without a spread.
  assert table[3] == "| blend | 1 | 50.0 | 80.0 | 0: 1 | 8.0 (49.0) | 40.0 (48.0) |"


def test_methods_pick_and_order_and_unknown_ones_are_named(grid_dir):
  rows = defense_table.read_aggregates(grid_dir)
  header = defense_table.markdown(rows, methods=["l1", "linf"]).splitlines()[0]
  assert header.endswith("| l1 | linf |")
  with pytest.raises(defense_table.DefenseTableError, match=r"no defense \['anp'\].*'linf'"):
    defense_table.markdown(rows, methods=["anp"])


def test_command_line_prints_the_table_and_fails_clearly(grid_dir, tmp_path, capsys):
  done = subprocess.run([sys.executable, "-m", "linfjax.reports.defense_table", grid_dir,
                         "--methods=linf"], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=60, check=False)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[2].endswith("| 9.2 ± 0.3 (60.0 ± 1.4) |")
  missing = str(tmp_path / "nothing")
  with pytest.raises(SystemExit) as exited:
    defense_table.main(["defense_table", missing])
  assert exited.value.code == 2 and "aggregates.csv: not found" in capsys.readouterr().err
  assert not os.path.exists(missing)
