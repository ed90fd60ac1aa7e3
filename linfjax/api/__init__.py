"""The paper's pipeline as functions a notebook can call, one per step of a run.

    dataset = load_dataset(config)                     # config: linfjax.config.base_config()
    split = clean_set(dataset, size=500, seed=0)       # the defender's clean set S
    trigger = make_attack("patch", dataset.image_shape)
    model, variables = train(config, dataset, split, trigger)
    evaluate(model, variables, dataset, trigger, target=0)            # {'CA', 'ASR', 'RA'}
    found = reverse_engineer(model, variables, s_images, settings=config.reverse, seed=0)
    verdict = detect(found)                            # flagged class (or None) and suspect
    shifts = activation_shifts(model, variables, s_images, trigger)  # per layer and norm
    record = defend("linf", model, variables, s_images, s_labels,
                    trigger=found.trigger(verdict.suspect), target=verdict.suspect)

Each function is a thin layer over the library the pipeline's stages use, with the same
random streams (linfjax/keys.py), so `train` gives the model the `train` stage trains from
the same config, `reverse_engineer` the stage's masks, and `defend` the prune stage's
choice. `run(config, workdir)` runs every stage into a directory and `load_run(workdir)`
reads one back: its config, results.json, models and synthetic trigger.

Images are uint8 [N, H, W, C] as datasets hold them (floats in [0, 1] work too); labels int
[N]; a trigger is any linfjax.attacks trigger (`attacks.Trigger`, `Signal`, `Warp`).

References:
  Xu et al., "Defending against Backdoor Attack on Deep Neural Networks", arXiv 2002.12162.
  Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
  Networks", IEEE S&P 2019.
"""

from linfjax.api.building import (clean_set, evaluate, load_dataset, make_attack, poison,
                                  train)
from linfjax.api.inspecting import (LayerShifts, activation_shifts, defend, detect,
                                    reverse_engineer)
from linfjax.api.runs import Run, SyntheticTrigger, load_run, run

__all__ = ["LayerShifts", "Run", "SyntheticTrigger", "activation_shifts", "clean_set", "defend",
           "detect", "evaluate", "load_dataset", "load_run", "make_attack", "poison",
           "reverse_engineer", "run", "train"]
