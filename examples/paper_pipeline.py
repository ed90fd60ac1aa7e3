"""The paper's pipeline through linfjax's API alone, printing what each step finds.

  python examples/paper_pipeline.py              # the quick setting: minutes on 2 CPU cores
  python examples/paper_pipeline.py --tiny       # a smoke run: a few hundred images, 1 epoch
  python examples/paper_pipeline.py --data=DIR/cifar10-subset   # data elsewhere

The quick setting is configs/cifar_patch.py:quick: a small CNN on the quick runs' reference
CIFAR-10 subset (that config's `data.path`, taken relative to the repository root; `python -m
linfjax.fetch DIR` writes the same subset to DIR/cifar10-subset), BadNets' 3x3 white patch,
target class 0, 10 % of the training images poisoned. The steps, as in Xu et al.:
  1. hold out the defender's clean set S; poison the rest and train a backdoored and a
     vanilla model (same recipe and seed); CA, ASR and RA on the test split;
  2. Neural Cleanse on S for both models: a synthetic trigger per class, and which class is
     an outlier (the suspect's trigger is the defender's);
  3. how the real and the synthetic trigger shift the l1, l2 and linf norms of the last conv
     layer's activation maps (the paper: linf singles out the backdoor's neurons);
  4. prune that layer by each norm's shift under the synthetic trigger, choosing r* on S,
     and measure CA and ASR (real trigger) on the test split before and after.
Every line starts with its step in brackets, e.g. `[prune] linf: r* = ...`.

References:
  Xu et al., "Defending against Backdoor Attack on Deep Neural Networks", arXiv 2002.12162.
"""

from __future__ import annotations

import os
import sys
import time

# Run from a checkout without installing linfjax: the repository root goes first on the path.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import linfjax  # noqa: E402
from linfjax import config as config_lib  # noqa: E402
from linfjax import errors  # noqa: E402

_TINY = flags.DEFINE_bool("tiny", False, "A smoke run: a few hundred images, 1 epoch, a 1/8-width "
                          "CNN, 2 Neural Cleanse steps (the numbers mean nothing).")
_DATA = flags.DEFINE_string("data", None, "The CIFAR-10 subset (a cifar-10-batches-py layout); "
                            "default: the quick config's data.path, from the repository root.")

NORMS = ("linf", "l2", "l1")


def make_config(data_path: str, *, tiny: bool):
  """configs/cifar_patch.py:quick on `data_path`; `tiny` shrinks it to a smoke run."""
  config = config_lib.make_quick(config_lib.base_config())
  config.trigger.update(config_lib.TRIGGER_PRESETS["patch"])
  config.data.path = data_path
  if tiny:
    config.data.update(train_limit=400, test_limit=200, clean_set_size=100)
    config.model.width = 0.125
    config.train.update(epochs=1, batch_size=32, eval_batch_size=100)
    config.reverse.update(steps=2, mini_batches=1, batch_size=16, success_images=32)
  return config


def _numbers(metrics: dict) -> str:
  return f"CA {metrics['CA']:.2f} ASR {metrics['ASR']:.2f} RA {metrics['RA']:.2f}"


def paper_pipeline(config) -> None:
  """Runs the four steps (module docstring), printing one line per finding."""
  dataset = linfjax.load_dataset(config)
  split = linfjax.clean_set(dataset, size=config.data.clean_set_size, seed=config.seed)
  s_images = dataset.train_images[split.clean_set_indices]
  s_labels = dataset.train_labels[split.clean_set_indices]
  print(f"[data] {len(dataset.train_labels)} training images: {len(split.train_indices)} to "
        f"train on, {len(s_images)} held out as S; {len(dataset.test_labels)} test images, "
        f"{dataset.num_classes} classes")

  trigger = linfjax.make_attack("patch", dataset.image_shape)
  target, mode = config.poison.target, config.poison.mode
  poisoned = linfjax.poison(config, dataset, split, trigger)
  print(f"[attack] BadNets' 3x3 white patch at the bottom-right corner, target {target}: "
        f"{len(poisoned.poison_indices)} of {len(poisoned.labels)} training images poisoned")

  def evaluate(model, variables, masks=None):
    return linfjax.evaluate(model, variables, dataset, trigger, target=target, mode=mode,
                            masks=masks, batch_size=config.train.eval_batch_size)

  trained = {}
  for kind in ("backdoored", "vanilla"):
    started = time.perf_counter()
    trained[kind] = linfjax.train(config, dataset, split, trigger,
                                  backdoored=kind == "backdoored")
    print(f"[train] {kind}: {_numbers(evaluate(*trained[kind]))} "
          f"({time.perf_counter() - started:.0f} s)")

  found = {}
  for kind, (model, variables) in trained.items():
    started = time.perf_counter()
    reversed_ = linfjax.reverse_engineer(model, variables, s_images, settings=config.reverse,
                                         seed=config.seed)
    verdict = linfjax.detect(reversed_, statistic=config.reverse.statistic)
    found[kind] = reversed_, verdict
    flagged = ("no class flagged" if verdict.flagged is None else
               f"class {verdict.flagged} flagged")
    suspect = ("no class reached the attack-success threshold" if verdict.suspect is None else
               f"suspect {verdict.suspect}, mask l1 {reversed_.mask_l1[verdict.suspect]:.1f}")
    print(f"[reverse] {kind}: {flagged}; {suspect} (median of the classes "
          f"{np.median(reversed_.mask_l1):.1f}) ({time.perf_counter() - started:.0f} s)")

  reversed_, verdict = found["backdoored"]
  triggers = {"real": trigger}
  if verdict.suspect is not None:
    triggers["synthetic"] = reversed_.trigger(verdict.suspect)
  for kind, (model, variables) in trained.items():
    for name, condition in triggers.items():
      for layer, shifts in linfjax.activation_shifts(model, variables, s_images,
                                                     condition).items():
        summary = "; ".join(f"{norm} z {shifts.summary[norm]['z']:.2f} rel "
                            f"{shifts.summary[norm]['rel']:.2f}" for norm in NORMS)
        print(f"[shifts] {kind} model, {name} trigger, {layer}: {summary}")

  model, variables = trained["backdoored"]
  if verdict.suspect is not None:
    defender, defender_target = triggers["synthetic"], verdict.suspect
    source = f"the synthetic trigger of class {verdict.suspect}"
  else:
    defender, defender_target = trigger, target
    source = "the real trigger (Neural Cleanse found no synthetic one)"
  before = evaluate(model, variables)
  print(f"[prune] layer {model.default_probe}, neurons ranked by {source}; before: "
        f"{_numbers(before)}")
  for norm in NORMS:
    record = linfjax.defend(norm, model, variables, s_images, s_labels, trigger=defender,
                            target=defender_target, config=config)
    after = evaluate(model, variables, masks=record.masks)
    neurons = sum(len(mask) for mask in record.masks.values())
    print(f"[prune] {norm}: r* = {record.pruned} of {neurons} neurons; CA {before['CA']:.2f} "
          f"-> {after['CA']:.2f}, ASR {before['ASR']:.2f} -> {after['ASR']:.2f}")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Only the findings, unless -v asks for logs.
  data_path = _DATA.value or os.path.normpath(os.path.join(REPO_ROOT, config_lib.SHARED_SUBSET))
  if not os.path.isdir(data_path):
    print(f"error: no CIFAR-10 subset at {data_path}; write one with `python -m linfjax.fetch "
          "DIR` and pass --data=DIR/cifar10-subset", file=sys.stderr)
    return errors.EXIT_USER_ERROR
  try:
    paper_pipeline(make_config(data_path, tiny=_TINY.value))
  except errors.UserError as error:
    print(f"error: {errors.one_line(error)}", file=sys.stderr)
    return errors.EXIT_USER_ERROR
  return 0


if __name__ == "__main__":
  app.run(main)
