"""The bench table (`defense_table --bench`): attacks x defenses over the planned seeds, with the
reason for every cell without a number, and its heat maps, from a hand-written grid."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from linfjax import attacks, defenses
from linfjax import config as config_lib
from linfjax.reports import bench_table, defense_table, figures
from linfjax.runs import grid
from test_config import _load_config_file
from test_grid_report import REPO_ROOT, _write_json

DEFENSES = ["linf", "anp", "nad"]
NO_TRIGGER = "no class of the backdoored model reached the attack-success threshold"


def _numbers(ca, asr, der):
  return {"r_star": 3, "CA": ca, "ASR_real": asr, "ASR_defender": 1.0, "DER": der}


def _finished(ca, asr, prune, flagged=0):
  return {"seed": 0, "train": {"backdoored": {"CA": ca, "ASR": asr}},
          "reverse": {"flagged": flagged}, "prune": {"synthetic": prune}}


# attack -> seed -> results.json (None: the run has started but not finished; absent: no
# directory at all).
RUNS = {
    "patch": {0: _finished(60.0, 90.0, {"linf": _numbers(59.0, 10.0, 90.0),
                                        "anp": _numbers(55.0, 20.0, 82.5),
                                        "nad": _numbers(50.0, 30.0, 75.0)}),
              1: _finished(62.0, 94.0, {"linf": _numbers(61.0, 14.0, 88.0),
                                        "anp": _numbers(57.0, 40.0, 77.5),
                                        "nad": _numbers(52.0, 36.0, 74.0)}),
              2: None},
    "sig": {seed: _finished(58.0, 99.0, {"skipped": NO_TRIGGER}, flagged=None)
            for seed in (0, 1, 2)},
    "wanet": {0: _finished(61.0, 30.0, {"linf": _numbers(60.0, 25.0, 52.0),
                                        "nad": {"skipped": "the teacher could not be tuned"}},
                           flagged=1)},
    "blend": {},
}


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bench"))
  listed = []
  for attack, seeds in RUNS.items():
    for seed in (0, 1, 2):
      name = f"trigger={attack},seed={seed}"
      listed.append({"name": name, "values": {"trigger": attack, "seed": seed}})
      if seed not in seeds:
        continue
      chosen = ["linf", "nad"] if attack == "wanet" else DEFENSES
      _write_json(os.path.join(root, "runs", name, "config.json"),
                  {"seed": seed, "stages": ["train", "reverse", "prune"],
                   "trigger": {"kind": attack, "clean_label": attack == "sig"},
                   "prune": {"defenses": chosen, "real_defenses": ["linf"]}})
      if seeds[seed] is not None:
        _write_json(os.path.join(root, "runs", name, "results.json"), seeds[seed])
  _write_json(os.path.join(root, "grid.json"),
              {"axes": [{"field": "trigger", "values": list(RUNS)},
                        {"field": "seed", "values": [0, 1, 2]}], "runs": listed})
  return root


def test_cells_are_means_over_the_seeds_run_or_say_why_not(grid_dir):
  table = bench_table.markdown(bench_table.build(grid_dir)).splitlines()
  assert table[0] == ("| trigger | seeds run | NC flagged | no defense (CA / ASR) | linf | anp "
                      "| nad |")
  assert table[1] == "|" + " --- |" * 7
  # patch: seeds 0 and 1 finished; linf CA 59, 61 -> 60.0, ASR 10, 14 -> 12.0, DER 90, 88 -> 89.
  assert table[2] == ("| patch | 2/3 | 0: 2 | 61.0 / 92.0 (2/3 seeds) | "
                      "60.0 / 12.0 / 89.0 (2/3 seeds) | 56.0 / 30.0 / 80.0 (2/3 seeds) | "
                      "51.0 / 33.0 / 74.5 (2/3 seeds) |")
  skipped = f"not applicable: {NO_TRIGGER}"
  assert table[3] == (f"| sig (clean-label) | 3/3 | null: 3 | 58.0 / 99.0 | {skipped} | "
                      f"{skipped} | {skipped} |")
  assert table[4] == ("| wanet | 1/3 | 1: 1 | 61.0 / 30.0 (1/3 seeds) | "
                      "60.0 / 25.0 / 52.0 (1/3 seeds) | "
                      "not run: not in the run's defenses (1/3 seeds) | "
                      "not applicable: the teacher could not be tuned (1/3 seeds) |")
  missing = "missing (0/3 seeds run)"
  assert table[5] == f"| blend | 0/3 | - | {missing} | {missing} | {missing} | {missing} |"
  assert len(table) == 6


def test_heat_maps_hold_the_means_and_label_the_cells_without_one(grid_dir, tmp_path,
                                                                   monkeypatch):
  table = bench_table.build(grid_dir, methods=["nad", "linf"])
  assert table.columns == ["no defense", "nad", "linf"]
  values, texts = table.heatmap("DER")
  nan = np.nan
  np.testing.assert_array_equal(values, [[nan, 74.5, 89.0], [nan, nan, nan],
                                         [nan, nan, 52.0], [nan, nan, nan]])
  assert texts == [["-", "74.5\n2/3 seeds", "89.0\n2/3 seeds"], ["-", "n/a", "n/a"],
                   ["-", "n/a", "52.0\n1/3 seeds"], ["missing"] * 3]
  drawn = {}
  real_heatmap = figures.heatmap

  def spy(values, texts, rows, columns, **kwargs):
    drawn[kwargs["title"]] = (np.asarray(values), rows, columns)
    return real_heatmap(values, texts, rows, columns, **kwargs)

  monkeypatch.setattr(figures, "heatmap", spy)
  written = bench_table.write(table, str(tmp_path), title="bench")
  assert [os.path.relpath(p, tmp_path) for p in written] == [
      "defense_table.md", "defense_table.html", "figures/heatmap.CA.png",
      "figures/heatmap.ASR_real.png", "figures/heatmap.DER.png"]
  for path in written[2:]:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  (ca, ca_rows, ca_columns), = [v for k, v in drawn.items() if k.startswith("bench\nCA")]
  assert ca.shape == (4, 3) and ca_columns == ["no defense", "nad", "linf"]
  assert ca_rows == ["patch", "sig (clean-label)", "wanet", "blend"]
  np.testing.assert_array_equal(ca[:, 0], [61.0, 58.0, 61.0, nan])
  with open(written[0]) as f:
    assert bench_table.markdown(table) in f.read()
  with open(written[1]) as f:
    page = f.read()
  assert "<td>not applicable: no class of the backdoored model" in page
  assert page.count("data:image/png;base64,") == 3


def test_real_source_and_unknown_defenses(grid_dir):
  table = bench_table.build(grid_dir, source="real")
  assert table.columns == ["no defense", "linf"]
  assert table.cells[1][1].text() == "not run: results.json has no prune.real"
  with pytest.raises(bench_table.BenchTableError, match=r"the defense\(s\) \['clp'\].*'nad'"):
    bench_table.build(grid_dir, methods=["clp"])


def test_command_line_writes_the_table_and_fails_in_one_line(grid_dir, tmp_path, capsys):
  out = str(tmp_path / "out")
  done = subprocess.run([sys.executable, "-m", "linfjax.reports.defense_table", grid_dir,
                         "--bench", f"--out={out}", "--methods=linf"], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=60, check=False)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[2] == ("| patch | 2/3 | 0: 2 | 61.0 / 92.0 (2/3 seeds) | "
                                         "60.0 / 12.0 / 89.0 (2/3 seeds) |")
  assert sorted(os.listdir(out)) == ["defense_table.html", "defense_table.md", "figures"]
  assert not os.path.exists(os.path.join(grid_dir, "defense_table.md"))
  missing = str(tmp_path / "nothing")
  with pytest.raises(SystemExit) as exited:
    defense_table.main(["defense_table", missing])
  assert exited.value.code == 2
  error = capsys.readouterr().err
  assert error.startswith("error: ") and "aggregates.csv: not found" in error
  assert error.count("\n") == 1
  with open(os.path.join(grid_dir, "grid.json")) as f:
    assert len(json.load(f)["runs"]) == 12


def test_the_bench_grid_is_every_attack_preset_by_three_seeds_and_every_defense():
  config = _load_config_file("configs/grid_bench.py")
  config_lib.validate(config)
  assert config.train.epochs == 10 and config.data.source == "cifar10_dir"  # quick
  runs = grid.expand(config)
  assert [run.name for run in runs] == [f"trigger={attack},seed={seed}"
                                        for attack in attacks.ATTACKS for seed in (0, 1, 2)]
  assert {run.config.trigger.kind for run in runs} == set(attacks.ATTACKS)
  assert [run.config.trigger.clean_label for run in runs if run.config.trigger.kind == "sig"] == [
      True] * 3
  chosen = tuple(runs[0].config.prune.defenses)
  assert chosen[:1] == ("linf",) and {"l2", "l1", *defenses.BASELINES} <= set(chosen)
  assert chosen == tuple(dict.fromkeys(defenses.DEFAULT_SYNTHETIC + defenses.BASELINES))
  assert runs[0].config.abl.enabled


def test_abl_is_a_column_from_the_train_stage(tmp_path):
  root = str(tmp_path)
  listed = []
  for seed, abl in [(0, {"CA": 55.0, "ASR": 4.0, "RA": 50.0, "DER": 90.0}), (1, None)]:
    name = f"seed={seed}"
    listed.append({"name": name, "values": {"seed": seed}})
    _write_json(os.path.join(root, "runs", name, "config.json"),
                {"seed": seed, "stages": ["train", "reverse", "prune"],
                 "abl": {"enabled": abl is not None},
                 "prune": {"defenses": ["linf"]}})
    result = _finished(60.0, 90.0, {"linf": _numbers(59.0, 10.0, 90.0)})
    if abl is not None:
      result["train"]["abl"] = abl
    _write_json(os.path.join(root, "runs", name, "results.json"), result)
  _write_json(os.path.join(root, "grid.json"),
              {"axes": [{"field": "seed", "values": [0, 1]}], "runs": listed})
  table = bench_table.build(root)
  assert table.columns == ["no defense", "abl", "linf"]
  abl_cell = table.cells[0][1]
  assert abl_cell.values == {"CA": [55.0], "ASR_real": [4.0], "DER": [90.0]}
  assert abl_cell.reasons == {"not run: abl.enabled was off": 1}
