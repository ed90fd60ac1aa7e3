import json

import pytest

from linfjax import summarize


def test_summary_by_hand(tmp_path, capsys):
  runs = [{"seed": 0, "train": {"backdoored": {"ASR": 90.0}}, "reverse": {"flagged": None}},
          {"seed": 1, "train": {"backdoored": {"ASR": 96.0}}, "reverse": {"flagged": 0}},
          {"seed": 2, "train": {"backdoored": {"ASR": 99.0}}}]
  summary = summarize.summarize(runs)
  asr = summary["train.backdoored.ASR"]
  assert asr["mean"] == pytest.approx(95.0)
  assert asr["std"] == pytest.approx(((25 + 1 + 16) / 2) ** 0.5)
  assert (asr["min"], asr["max"], asr["n"]) == (90.0, 99.0, 3)
  assert summary["reverse.flagged"]["n"] == 1
  dirs = []
  for i, run in enumerate(runs):
    d = tmp_path / f"r{i}"
    d.mkdir()
    (d / "results.json").write_text(json.dumps(run))
    dirs.append(str(d))
  assert summarize.main(["summarize", *dirs]) == 0
  assert "| train.backdoored.ASR | 95.00 | 4.58 | 90.00 | 99.00 | 3 |" in capsys.readouterr().out
  assert summarize.main(["summarize", str(tmp_path)]) == 1
