"""The data-side detectors (`linfjax.detection.detectors.DETECTORS`) measured on finished runs.

    python -m linfjax.reports.data_detection RUN [RUN ...] [--json FILE]

For each RUN (a run directory whose `train` stage finished), the backdoored model's training
set is rebuilt as the run poisoned it (`linfjax.poison`, the same seed; the poisoned indices
are checked against train/split.npz) and its flagged images stamped as the training step
stamps them, so the features are those of the images the model was trained on.
Spectral signatures (eps = the run's poison rate) and activation clustering scan every class
of the backdoored model's penultimate features and are scored by precision and recall against
the poisoned indices. STRIP, with its defaults, thresholds on the clean test images (FRR) and
flags the test images of the classes the attack can flip, stamped with the run's own trigger
(FAR); its overlays are the defender's clean set S. Prints one Markdown table (a mean row per
detector when there are several runs); --json writes the numbers. Nothing is written into a
RUN. A bad RUN is one line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import linfjax
from linfjax import attacks, errors, files
from linfjax.detection import activation_clustering
from linfjax.detection.detectors import DETECTORS
from linfjax.detection.data_features import penultimate_features, precision_recall
from linfjax.reports import html

TRAINING_SET_DETECTORS = ("spectral_signatures", "activation_clustering")
COLUMNS = ("flagged", "scanned", "precision", "recall", "FRR", "FAR")


def stamped(images: np.ndarray, flags: np.ndarray, trigger) -> np.ndarray:
  """Float images in [0, 1], the `flags` ones stamped with `trigger` (what the training step
  does after augmentation; the images it stamped before are returned as they are)."""
  out = np.asarray(images, np.float32) / 255.0
  if flags.any():
    out[flags] = np.asarray(attacks.apply(trigger, jnp.asarray(out[flags])))
  return out


def score_training_set(features, labels, poison_indices, rate: float) -> dict[str, dict]:
  """Spectral signatures and activation clustering on one training set's features."""
  flagged = {
      "spectral_signatures": DETECTORS["spectral_signatures"].run(
          features, labels, expected_poison_fraction=rate),
      "activation_clustering": DETECTORS["activation_clustering"].run(
          features, labels, dims=min(activation_clustering.DIMS, features.shape[1])),
  }
  scores = {}
  for name, indices in flagged.items():
    precision, recall = precision_recall(indices, poison_indices)
    scores[name] = {"flagged": len(indices), "scanned": len(labels),
                    "poisoned": len(poison_indices), "precision": precision, "recall": recall}
  return scores


def score_strip(predict_fn: Callable, clean, triggered, overlays) -> dict:
  """STRIP with its defaults: FRR on `clean`, FAR on `triggered` images."""
  result = DETECTORS["strip"].run(predict_fn, clean, triggered, overlays)
  return {"flagged": int(result.flagged.sum()), "scanned": len(triggered),
          "clean": len(clean), "threshold": result.threshold, "FRR": result.frr,
          "FAR": result.far}


def flippable(labels: np.ndarray, *, mode: str, target: int) -> np.ndarray:
  """The images an attack can flip: every one (all-to-all) or those not of the target."""
  return np.ones(len(labels), bool) if mode == "all_to_all" else labels != target


def open_run(workdir: str) -> linfjax.Run:
  """The run, refused (one-line UserError) unless its train stage finished."""
  if not os.path.isdir(workdir):
    raise errors.UserError(f"{workdir}: not a directory (give a linfjax run directory)")
  run = linfjax.load_run(workdir)
  if "train" not in run.results:
    raise errors.UserError(f"{workdir}: results.json has no finished train stage (run it "
                           "with `python -m linfjax.main`)")
  return run


def measure(run: linfjax.Run) -> dict[str, dict]:
  """Every detector's numbers on one finished run."""
  config = run.config
  poisoned = linfjax.poison(config, run.dataset, run.split, run.trigger)
  saved = os.path.join(run.workdir, "train", "split.npz")
  if os.path.exists(saved) and not np.array_equal(np.load(saved)["poison_indices"],
                                                  poisoned.poison_indices):
    raise errors.UserError(f"{saved}: its poisoned indices differ from the rebuilt ones (was "
                           "the data changed since the run?)")
  model, variables = run.model("backdoored")
  images = stamped(poisoned.images, poisoned.stamp_after_augmentation, run.trigger)
  features = penultimate_features(model, variables, images,
                                  batch_size=config.train.eval_batch_size)
  scores = score_training_set(features, poisoned.labels, poisoned.poison_indices,
                              config.poison.rate)
  predict = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x)[0]))
  test_images, test_labels = run.dataset.test_images, run.dataset.test_labels
  keep = flippable(test_labels, mode=config.poison.mode, target=config.poison.target)
  triggered = stamped(test_images[keep], np.ones(int(keep.sum()), bool), run.trigger)
  scores["strip"] = score_strip(lambda x: predict(variables, x), test_images, triggered,
                                run.clean_set[0])
  return scores


def means(per_run: dict[str, dict]) -> dict[str, dict]:
  """Per detector, the mean of each number over the runs."""
  names = next(iter(per_run.values())).keys()
  return {name: {key: float(np.mean([scores[name][key] for scores in per_run.values()]))
                 for key in next(iter(per_run.values()))[name]} for name in names}


def _cell(scores: dict, key: str) -> str:
  if key not in scores:
    return "-"
  value = scores[key]
  return f"{value:.3f}" if isinstance(value, float) and key not in ("flagged", "scanned") \
      else f"{value:g}"


def table(per_run: dict[str, dict]) -> str:
  """One Markdown row per run and detector (then the means over runs, when several)."""
  groups = dict(per_run)
  if len(per_run) > 1:
    groups[f"mean of {len(per_run)}"] = means(per_run)
  rows = [(run, name, *(_cell(numbers, key) for key in COLUMNS))
          for run, scores in groups.items() for name, numbers in scores.items()]
  return html.markdown(("run", "detector", *COLUMNS), rows) + "\n"


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m linfjax.reports.data_detection",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", metavar="RUN", help="finished run directories")
  parser.add_argument("--json", default="", help="also write the numbers to this JSON file")
  args = parser.parse_args(argv[1:])
  try:
    opened = [open_run(workdir) for workdir in args.runs]  # Every RUN checked first.
    per_run = {run.workdir: measure(run) for run in opened}
  except errors.UserError as e:
    print(f"error: {errors.one_line(e)}", file=sys.stderr)
    return errors.EXIT_USER_ERROR
  print(table(per_run), end="")
  if args.json:
    files.write_json(args.json, {"runs": per_run, "mean": means(per_run)})
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
