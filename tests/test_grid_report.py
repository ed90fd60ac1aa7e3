"""The grid report: grid.csv, aggregates.csv, figures and HTML from hand-written grid dirs."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from linfjax.reports import grid_report, grid_runs
from linfjax.reports import results as results_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["train", "reverse", "prune"]
T_975_2 = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom


def _write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _results(seed, ca, asr, *, flagged=0):
  """A complete results.json whose numbers derive from (ca, asr)."""
  return {"seed": seed,
          "train": {"backdoored": {"CA": ca, "ASR": asr, "RA": 2.0},
                    "vanilla": {"CA": ca + 1.0, "ASR": 1.0, "RA": 50.0}, "poisoned": 45},
          "reverse": {"flagged": flagged, "anomaly_index": [3.5, 0.25]},
          "prune": {"synthetic": {"linf": {"r_star": 4, "CA": ca - 1.0, "ASR_real": asr / 10,
                                           "DER": 90.0},
                                  "l1": {"r_star": 8, "CA": ca - 2.0, "ASR_real": asr / 2,
                                         "DER": 60.0}},
                    "real": {"skipped": "not asked for"}}}


def _grid(root, axes, runs):
  """Writes grid.json; `runs` maps a run's axis values to its results.json (None: no file)."""
  fields = [field for field, _ in axes]
  listed = []
  for values, results in runs:
    name = ",".join(f"{field}={values[field]}" for field in fields)
    listed.append({"name": name, "values": values})
    run_dir = os.path.join(root, "runs", name)
    _write_json(os.path.join(run_dir, "config.json"), {"seed": 0, "stages": STAGES})
    if results is not None:
      _write_json(os.path.join(run_dir, "results.json"), results)
  _write_json(os.path.join(root, "grid.json"),
              {"axes": [{"field": f, "values": v} for f, v in axes], "runs": listed})
  return [run["name"] for run in listed]


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


AXES = [("trigger", ["patch", "blend"]), ("poison.rate", [0.05, 0.1]), ("seed", [0, 1, 2])]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
  """Twelve runs: every status, n = 3, 1, 1 and 2 finished runs per (trigger, rate)."""
  root = str(tmp_path_factory.mktemp("grid"))
  def values(trigger, rate, seed):
    return {"trigger": trigger, "poison.rate": rate, "seed": seed}
  names = _grid(root, AXES, [
      (values("patch", 0.05, 0), _results(0, 1.0, 90.0)),
      (values("patch", 0.05, 1), _results(1, 2.0, 92.0, flagged=None)),
      (values("patch", 0.05, 2), _results(2, 4.0, 97.0)),
      (values("patch", 0.1, 0), _results(0, 10.0, 99.0)),
      (values("patch", 0.1, 1), {"seed": 1, "train": {"backdoored": {"CA": 500.0}}}),
      (values("patch", 0.1, 2), {"seed": 2, "train": {"backdoored": {"CA": 600.0}}}),
      (values("blend", 0.05, 0), _results(0, 20.0, 50.0)),
      (values("blend", 0.05, 1), None),
      (values("blend", 0.05, 2), None),
      (values("blend", 0.1, 0), _results(0, 30.0, 70.0)),
      (values("blend", 0.1, 1), _results(1, 40.0, 80.0)),
      (values("blend", 0.1, 2), None)])
  _write_json(os.path.join(root, "runs", names[4], "error.json"),
              {"error": "ValueError", "message": "poison rate too <high>",
               "traceback": "Traceback (most recent call last): ..."})
  with open(os.path.join(root, "runs", names[7], "results.json"), "w") as f:
    f.write('{"seed": 1, "train": {')
  os.remove(os.path.join(root, "runs", names[8], "config.json"))
  os.makedirs(os.path.join(root, "runs", names[11]), exist_ok=True)
  with open(os.path.join(root, "runs", names[0], "report.html"), "w") as f:
    f.write("<html></html>")
  path = grid_report.write_grid_report(root)
  return root, names, path


def test_grid_csv_has_a_row_per_run_with_status_axes_and_every_number(grid):
  root, names, _ = grid
  rows = _read_csv(os.path.join(root, "grid.csv"))
  assert [row["name"] for row in rows] == names
  assert [row["status"] for row in rows] == [
      "finished", "finished", "finished", "finished", "failed", "incomplete",
      "finished", "failed", "incomplete", "finished", "finished", "incomplete"]
  header = list(rows[0])
  assert header[:5] == ["name", "status", "trigger", "poison.rate", "seed"]
  assert header.count("seed") == 1
  assert header[5:9] == ["train.backdoored.CA", "train.backdoored.ASR", "train.backdoored.RA",
                         "train.vanilla.CA"]
  assert {"reverse.flagged", "reverse.anomaly_index.0", "reverse.anomaly_index.1",
          "prune.synthetic.linf.DER", "prune.synthetic.l1.r_star"} <= set(header)
  assert not any(column.startswith("prune.real") for column in header)  # a string only
  first, second = rows[0], rows[1]
  assert (first["trigger"], first["poison.rate"], first["seed"]) == ("patch", "0.05", "0")
  assert first["train.backdoored.CA"] == "1.0"
  assert first["prune.synthetic.linf.ASR_real"] == "9.0"
  assert first["prune.synthetic.linf.r_star"] == "4"
  assert first["reverse.anomaly_index.0"] == "3.5"
  assert (first["reverse.flagged"], second["reverse.flagged"]) == ("0", "")
  assert rows[4]["train.backdoored.CA"] == "500.0"  # a failed run keeps its partial numbers
  assert rows[4]["train.backdoored.ASR"] == ""
  assert rows[7]["train.backdoored.CA"] == ""  # corrupt results.json


def test_aggregates_are_mean_sd_and_t_interval_over_finished_runs_only(grid):
  root, _, _ = grid
  rows = _read_csv(os.path.join(root, "aggregates.csv"))
  assert [(r["trigger"], r["poison.rate"], r["runs"], r["finished"]) for r in rows] == [
      ("patch", "0.05", "3", "3"), ("patch", "0.1", "3", "1"), ("blend", "0.05", "3", "1"),
      ("blend", "0.1", "3", "2")]
  assert "seed" not in rows[0] and "seed.n" not in rows[0]
  three = rows[0]
  sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
  assert three["train.backdoored.CA.n"] == "3"
  assert float(three["train.backdoored.CA.mean"]) == pytest.approx(2.3333, abs=1e-4)
  assert float(three["train.backdoored.CA.sd"]) == pytest.approx(1.5275, abs=1e-4)
  assert float(three["train.backdoored.CA.sd"]) == pytest.approx(sd)
  assert float(three["train.backdoored.CA.ci95"]) == pytest.approx(T_975_2 * sd / math.sqrt(3))
  # 3.7946 (4.303 * 1.5275 / sqrt(3) = 3.7948 with the rounded t and sd)
  assert float(three["train.backdoored.CA.ci95"]) == pytest.approx(3.7946, abs=1e-4)
  assert float(three["prune.synthetic.linf.ASR_real.mean"]) == pytest.approx(9.3)
  # A class index is counted, never averaged; null is a value of its own.
  assert "reverse.flagged.mean" not in three
  assert three["reverse.flagged.counts"] == "0: 2, null: 1"
  # One finished run: the failed (CA 500) and the incomplete (CA 600) ones are left out.
  one = rows[1]
  assert (one["train.backdoored.CA.n"], one["train.backdoored.CA.mean"]) == ("1", "10.0")
  assert (one["train.backdoored.CA.sd"], one["train.backdoored.CA.ci95"]) == ("", "")
  two = rows[3]
  assert float(two["train.backdoored.CA.mean"]) == pytest.approx(35.0)
  assert float(two["train.backdoored.CA.ci95"]) == pytest.approx(
      12.706204736174705 * math.sqrt(50.0) / math.sqrt(2))


def test_mean_ci_matches_hand_computed_values():
  stats = grid_runs.mean_ci([1.0, 2.0, 4.0])
  assert stats["n"] == 3
  assert stats["mean"] == pytest.approx(7 / 3)
  assert stats["sd"] == pytest.approx(1.527525, abs=1e-6)
  assert stats["ci95"] == pytest.approx(3.794583, abs=1e-6)
  assert grid_runs.mean_ci([5.0]) == {"n": 1, "mean": 5.0, "sd": None, "ci95": None}
  assert grid_runs.mean_ci([]) == {"n": 0, "mean": None, "sd": None, "ci95": None}


def test_flatten_indexes_lists_keeps_nulls_and_drops_strings():
  tree = {"seed": 3, "reverse": {"flagged": None, "anomaly_index": [0.5, 3.0], "ok": True},
          "prune": {"real": {"skipped": "no"}}}
  assert results_lib.flatten(tree) == {
      "seed": 3, "reverse.flagged": None, "reverse.anomaly_index.0": 0.5,
      "reverse.anomaly_index.1": 3.0}
  # The summaries leave lists out.
  assert results_lib.flatten(tree, lists=False) == {"seed": 3, "reverse.flagged": None}


def test_figures_are_written_per_pruning_method(grid):
  root, _, _ = grid
  assert sorted(os.listdir(os.path.join(root, "figures"))) == [
      "prune.synthetic.l1.png", "prune.synthetic.linf.png", "train.backdoored.png"]
  for name in os.listdir(os.path.join(root, "figures")):
    with open(os.path.join(root, "figures", name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_html_shows_status_failures_headlines_figures_and_links(grid):
  root, names, path = grid
  assert path == os.path.join(root, "grid_report.html")
  with open(path) as f:
    text = f.read()
  assert "<td class=\"text\">finished</td><td>7</td>" in text
  assert "<td class=\"text\">failed</td><td>2</td>" in text
  assert "<td class=\"text\">incomplete</td><td>3</td>" in text
  assert "poison rate too &lt;high&gt;" in text and "ValueError" in text
  assert "results.json is not valid JSON" in text
  assert "2.33 ± 3.79 (3)" in text  # train.backdoored.CA of patch, 0.05
  assert "10.00 (1)" in text
  assert "After pruning, synthetic trigger" in text and "After pruning, real" not in text
  assert text.count("data:image/png;base64,") == 3
  assert text.count('href="runs/') == 1
  assert f'href="runs/{names[0]}/report.html"' in text


def test_without_poison_rate_the_first_axis_is_the_x_axis(tmp_path):
  root = str(tmp_path)
  _grid(root, [("trigger", ["patch", "blend"]), ("seed", [0, 1])],
        [({"trigger": t, "seed": s}, _results(s, 50.0 + s, 90.0)) for t in ("patch", "blend")
         for s in (0, 1)])
  grid_report.write_grid_report(root)
  assert "train.backdoored.png" in os.listdir(os.path.join(root, "figures"))
  rows = _read_csv(os.path.join(root, "aggregates.csv"))
  assert [(r["trigger"], r["train.backdoored.CA.mean"]) for r in rows] == [
      ("patch", "50.5"), ("blend", "50.5")]


def test_seed_only_grid_has_one_group_and_no_line_plots(tmp_path):
  root = str(tmp_path)
  _grid(root, [("seed", [0, 1])], [({"seed": s}, _results(s, 10.0 * (s + 1), 90.0))
                                   for s in (0, 1)])
  with open(grid_report.write_grid_report(root)) as f:
    assert "no axis besides seed" in f.read()
  rows = _read_csv(os.path.join(root, "aggregates.csv"))
  assert len(rows) == 1 and rows[0]["train.backdoored.CA.mean"] == "15.0"
  assert not os.path.exists(os.path.join(root, "figures"))


def test_command_line_writes_the_report_and_fails_clearly(tmp_path):
  root = str(tmp_path / "grid")
  _grid(root, AXES[1:], [({"poison.rate": r, "seed": s}, _results(s, 60.0, 95.0))
                         for r in (0.05, 0.1) for s in (0, 1)])
  done = subprocess.run([sys.executable, "-m", "linfjax.reports.grid_report", root], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=60, check=False)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == os.path.join(root, "grid_report.html")
  assert {"grid.csv", "aggregates.csv", "grid_report.html", "figures"} <= set(os.listdir(root))
  with pytest.raises(SystemExit, match="grid.json: not found"):
    grid_report.main(["grid_report", str(tmp_path / "nothing")])


@pytest.mark.parametrize("content, problem", [
    (None, "not found"),
    ('{"axes": [', "not valid JSON"),
    ('[1, 2]', "expected an object"),
    ('{"axes": [{"field": "seed"}], "runs": []}', r"axes\[0\] should be"),
    ('{"axes": [], "runs": []}', "lists no runs"),
    ('{"axes": [{"field": "seed", "values": [0]}], "runs": [{"name": "a", "values": {}}]}',
     "run 'a' should give one value per axis"),
    ('{"axes": [], "runs": [{"name": "../x", "values": {}}]}', "directory name"),
])
def test_bad_grid_json_names_the_file_and_the_problem(tmp_path, content, problem):
  if content is not None:
    (tmp_path / "grid.json").write_text(content)
  with pytest.raises(grid_runs.GridReportError, match=problem) as raised:
    grid_report.write_grid_report(str(tmp_path))
  assert str(tmp_path / "grid.json") in str(raised.value)


def test_unreadable_run_files_make_a_failed_run_with_the_reason(tmp_path):
  root = str(tmp_path)
  _write_json(os.path.join(root, "runs", "a", "config.json"), {"seed": 0})
  _write_json(os.path.join(root, "runs", "a", "results.json"), _results(0, 1.0, 2.0))
  run = grid_runs.read_run(root, "a", {})
  assert (run.status, run.error) == ("failed", "unreadable run files")
  assert "'stages' should be a list" in run.message
  _write_json(os.path.join(root, "runs", "b", "results.json"), [1, 2])
  assert "results.json holds a list" in grid_runs.read_run(root, "b", {}).message
  assert grid_runs.read_run(root, "missing", {}).status == "incomplete"
