"""The run report: the run's numbers and every figure in one self-contained HTML file."""

import base64
import json
import os
import re

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from linfjax.runs import pipeline
from linfjax.reports import report
from linfjax.runs.stages import train as train_stage
from test_pipeline import tiny_config
from test_reverse import PlantedModel

RESULTS = {
    "seed": 0,
    "train": {"backdoored": {"CA": 61.234, "ASR": 97.5, "RA": 2.25},
              "vanilla": {"CA": 63.75, "ASR": 4.125, "RA": 60.5},
              "poisoned": 458, "clean_set": 500},
    "reverse": {"flagged": None, "suspect": 0, "anomaly_index": [0.5, 1.25],
                "log_index": [2.375, None], "mask_l1": [30.0, 41.5], "succeeded": [True, False],
                "vanilla": {"flagged": None, "suspect": 1, "anomaly_index": [0.75, 0.5],
                            "log_index": [0.625, 0.25], "mask_l1": [44.0, 40.0],
                            "succeeded": [True, True]}},
    "analysis": {"backdoored": {"conv3_2": {"linf": {"z": 7.125, "top1_share": 0.3125,
                                                     "rel": 4.5}}},
                 "vanilla": {"conv3_2": {"linf": {"z": 2.875, "top1_share": 0.0625,
                                                  "rel": 0.5}}},
                 "attention": {"backdoored": {"clean": 0.125, "real": 0.8125},
                               "vanilla": {"clean": 0.0625, "real": 0.1875}}},
    "prune": {"synthetic": {"linf_layers_ft": {"r_star": 17, "CA": 58.125, "ASR_real": 4.875,
                                               "ASR_defender": 0.25, "dCA": 3.109,
                                               "dASR": 92.625, "DER": 94.758}},
              "real": {"linf": {"r_star": 3, "CA": 59.875, "ASR_real": 1.625,
                                "ASR_defender": 1.5, "dCA": 1.359, "dASR": 95.875,
                                "DER": 97.258}}},
}


def _png(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  figure = Figure(figsize=(1, 1), dpi=20)
  FigureCanvasAgg(figure)
  figure.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
  figure.savefig(path, format="png")
  with open(path, "rb") as f:
    return f.read()


def _embedded(text):
  return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"',
                                                        text)]


def _write_run(workdir, results, **config):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"seed": 0, "model": {"name": "cnn"}, **config}, f)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f)


def test_report_holds_the_numbers_and_embeds_every_figure(tmp_path):
  workdir = str(tmp_path / "run")
  _write_run(workdir, RESULTS)
  figures = {name: _png(os.path.join(workdir, name)) for name in
             ("reverse/backdoored/triggers.png", "prune/curves_real.png", "elsewhere/extra.png")}
  path = report.write_report(workdir)
  assert path == os.path.join(workdir, "report.html")
  with open(path) as f:
    text = f.read()
  for number in ("61.23", "97.50", "63.75", "59.88", "1.62", "97.26", "7.125", "0.812", "41.50",
                 "2.38", "58.12", "94.76"):
    assert number in text, number
  assert "no class flagged; most suspicious class 0" in text
  assert "<b>not flagged</b> by Neural Cleanse" in text
  assert "<h2>Other figures</h2>" in text and "elsewhere/extra.png" in text
  assert sorted(_embedded(text)) == sorted(figures.values())
  assert text.index("reverse/backdoored/triggers.png") < text.index("prune/curves_real.png")


def test_report_copes_with_absent_stages(tmp_path):
  workdir = str(tmp_path / "run")
  _write_run(workdir, {"seed": 0, "train": RESULTS["train"]})
  with open(report.write_report(workdir)) as f:
    text = f.read()
  assert "61.23" in text
  for stage in ("reverse", "analysis", "prune"):
    assert f"the {stage} stage has not run" in text
  assert _embedded(text) == []
  # A grid that asked for train and reverse only: the stages it left out are said to be so.
  asked = str(tmp_path / "asked")
  _write_run(asked, {"seed": 0, "train": RESULTS["train"]}, stages=["train", "reverse"])
  with open(report.write_report(asked)) as f:
    text = f.read()
  assert "the reverse stage has not run" in text
  for stage in ("analysis", "prune"):
    assert f"the {stage} stage was not asked for (config stages: train, reverse)" in text
    assert f"the {stage} stage has not run" not in text
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  with open(report.write_report(empty)) as f:
    assert "the train stage has not finished" in f.read()


def test_pipeline_end_to_end_writes_prune_results_and_report(cifar_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(cifar_dir)
  config.stages = ("train", "reverse", "analysis", "prune")
  config.reverse.update(steps=2, mini_batches=2, batch_size=10, checkpoint_every=1)
  results = pipeline.run(config, workdir, progress=False)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == results
  assert set(results) == {"seed", "train", "reverse", "analysis", "prune"}
  assert set(results["prune"]) == {"synthetic", "real"}
  methods = {"linf", "l2", "l1", "linf_ft", "l2_ft", "l1_ft", "linf_layers", "linf_layers_ft",
             "fine_pruning", "fine_tuning"}
  assert set(results["prune"]["synthetic"]) == methods
  assert set(results["prune"]["real"]) == {"linf", "l2", "l1", "fine_pruning"}
  seconds = {}
  for method in methods:
    with open(os.path.join(workdir, "prune", "synthetic", f"{method}.json")) as f:
      seconds[method] = json.load(f)["seconds"]
  assert all(value > 0 for value in seconds.values()), seconds
  path = os.path.join(workdir, "report.html")
  with open(path) as f:
    text = f.read()
  assert f"{results['train']['backdoored']['CA']:.2f}" in text
  assert f"{results['prune']['real']['linf']['DER']:.2f}" in text
  pngs = [os.path.join(root, name) for root, _, files in os.walk(workdir) for name in files
          if name.endswith(".png")]
  assert any(p.endswith("curves_real.png") for p in pngs)
  assert len(_embedded(text)) == len(pngs) >= 5

  os.remove(path)
  assert pipeline.run(config, workdir, progress=False) == results  # Every stage finished.
  with open(path) as f:
    assert len(_embedded(f.read())) == len(pngs)


def test_report_of_a_run_whose_planted_trigger_neural_cleanse_flags(cifar_dir, tmp_path,
                                                                    monkeypatch):
  """The realistic path end to end: reverse engineering (on a model with a planted backdoor)
  flags class 6, and analysis, pruning and the report use its synthetic trigger."""
  workdir = str(tmp_path / "run")
  config = tiny_config(cifar_dir)
  config.stages = ("train", "reverse", "analysis", "prune")
  config.reverse.update(steps=40, mini_batches=2, batch_size=10, patience=4,
                        early_stop_patience=8, checkpoint_every=10, success_images=0)
  planted = {"backdoored": PlantedModel(10, target=6), "vanilla": PlantedModel(10)}
  real_reverse = pipeline.STAGES["reverse"]

  def planted_reverse(ctx):
    with monkeypatch.context() as patched:
      patched.setattr(train_stage, "load_trained", lambda ctx, kind: (planted[kind], {}))
      return real_reverse(ctx)

  monkeypatch.setitem(pipeline.STAGES, "reverse", planted_reverse)
  results = pipeline.run(config, workdir, progress=False)
  assert results["reverse"]["flagged"] == results["reverse"]["suspect"] == 6
  assert results["reverse"]["vanilla"]["flagged"] is None
  assert "synthetic" in results["analysis"]["attention"]["backdoored"]
  with open(os.path.join(workdir, "prune", "synthetic", "linf.json")) as f:
    assert json.load(f)["target"] == 6
  with open(os.path.join(workdir, "report.html")) as f:
    text = f.read()
  assert "Backdoored model: <b>class 6 flagged</b>" in text
  assert "class 6's: flagged by Neural Cleanse." in text
  synthetic = text[text.index("synthetic trigger (the realistic setting)"):
                   text.index("real trigger (analysis only)")]
  for method, numbers in results["prune"]["synthetic"].items():
    assert f"<td class=\"text\">{method}</td>" in synthetic
    assert f"{numbers['ASR_defender']:.2f}" in synthetic and f"{numbers['DER']:.2f}" in synthetic


def test_the_text_summary_a_finished_run_prints():
  results = json.loads(json.dumps(RESULTS))
  results["prune"]["synthetic"] = {"skipped": "no class reached the threshold"}
  lines = report.summary_text("runs/x", results).splitlines()
  assert lines[0] == "Neural Cleanse on the backdoored model: no class flagged; most " \
                     "suspicious class 0"
  assert lines[1].split() == ["model", "r*", "CA", "ASR", "RA"]
  assert lines[2].split() == ["backdoored,", "no", "defense", "-", "61.23", "97.50", "2.25"]
  assert lines[4].split() == ["linf", "(real", "trigger)", "3", "59.88", "1.62", "-"]
  assert lines[5] == "prune, synthetic trigger: skipped: no class reached the threshold"
  assert lines[6] == ("Every number: runs/x/results.json; tables and figures: "
                      "runs/x/report.html")
