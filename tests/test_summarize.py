import json

import pytest

from linfjax.reports import summarize

RUNS = [{"seed": 0, "train": {"backdoored": {"ASR": 90.0}}, "reverse": {"flagged": None},
         "prune": {"synthetic": {"skipped": "no class flagged"}}},
        {"seed": 1, "train": {"backdoored": {"ASR": 96.0}}, "reverse": {"flagged": 0},
         "prune": {"synthetic": {"linf": {"CA": 50.0}}}},
        {"seed": 2, "train": {"backdoored": {"ASR": 99.0}},
         "reverse": {"flagged": None, "suspect": 3},
         "prune": {"synthetic": {"linf": {"CA": None}}}}]


def test_summary_by_hand():
  summary = summarize.summarize(RUNS)
  asr = summary["train.backdoored.ASR"]
  assert asr["mean"] == pytest.approx(95.0)
  assert asr["std"] == pytest.approx(((25 + 1 + 16) / 2) ** 0.5)
  assert (asr["min"], asr["max"], asr["n"], asr["runs"]) == (90.0, 99.0, 3, 3)
  # Seeds and class indices are never averaged; null is not a number.
  assert not {"seed", "reverse.flagged", "reverse.suspect"} & set(summary)
  ca = summary["prune.synthetic.linf.CA"]
  assert (ca["mean"], ca["n"], ca["runs"]) == (50.0, 1, 3)


def test_labels_are_counted_with_null_and_absent():
  assert summarize.categorical_counts(RUNS) == {
      "seed": {"0": 1, "1": 1, "2": 1},
      "reverse.flagged": {"null": 2, "0": 1},
      "reverse.suspect": {"absent": 2, "3": 1}}


def test_main_prints_both_tables_and_says_when_a_row_averages_fewer_runs(tmp_path, capsys):
  dirs = []
  for i, run in enumerate(RUNS):
    d = tmp_path / f"r{i}"
    d.mkdir()
    (d / "results.json").write_text(json.dumps(run))
    dirs.append(str(d))
  assert summarize.main(["summarize", *dirs]) == 0
  out = capsys.readouterr().out
  assert "| train.backdoored.ASR | 95.00 | 4.58 | 90.00 | 99.00 | 3 |" in out
  assert "| prune.synthetic.linf.CA | 50.00 | 0.00 | 50.00 | 50.00 | 1 of 3 |" in out
  assert "average only the runs that have the number" in out
  assert "| reverse.flagged | null: 2, 0: 1 |" in out
  assert "| seed |" not in out.split("Labels")[0]
  assert summarize.main(["summarize", str(tmp_path)]) == 2
  assert capsys.readouterr().err.startswith("error: ")


def test_paired_differences_of_the_paper_defense():
  def run(linf, l2, l1):
    entry = lambda asr, der: {"ASR_real": asr, "CA": 60.0, "DER": der}
    return {"prune": {"synthetic": {"linf": entry(*linf), "l2": entry(*l2), "l1": entry(*l1)},
                      "real": {"skipped": "no reverse stage"}}}
  results = [run((10.0, 90.0), (20.0, 85.0), (5.0, 95.0)),
             run((30.0, 80.0), (25.0, 82.0), (40.0, 70.0)),
             run((2.0, 97.0), (12.0, 92.0), (4.0, 96.0))]
  rows = {(r["source"], r["second"], r["key"]): r for r in summarize.paired_differences(results)}
  asr_l2 = rows[("synthetic", "l2", "ASR_real")]
  assert asr_l2["differences"] == [-10.0, 5.0, -10.0]
  assert asr_l2["mean"] == -5.0 and asr_l2["first_better"] == 2 and asr_l2["n"] == 3
  der_l1 = rows[("synthetic", "l1", "DER")]
  assert der_l1["differences"] == [-5.0, 10.0, 1.0] and der_l1["first_better"] == 2
  assert rows[("synthetic", "l1", "CA")]["first_better"] == 0  # Equal CA favours neither.
  assert not any(source == "real" for source, _, _ in rows)
  table = summarize.paired_table(summarize.paired_differences(results))
  assert "| synthetic | ASR_real: linf - l2 | -10.0, +5.0, -10.0 | -5.00 | 2 of 3 |" in table
