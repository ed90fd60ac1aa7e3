"""LC: the label-consistent attack, clean-label, made on a clean model.

The poisoned examples are target-class images that keep their labels. Before the trigger is
stamped on them, each is pushed away from its own (true) class by untargeted L-inf PGD on the
clean model, so it is hard to classify from its content and the backdoored model leans on
the trigger to fit its label:

  x_0 = x,  x_{k+1} = clip(x + clip(x_k + a * sign(grad_x CE(f(x_k), y)) - x, -eps, eps), 0, 1)

for `lc_steps` steps (no random start), then rounded to uint8 pixels. The trigger is the
reference's 3x3 black-and-white patch in the image corners, stamped on the perturbed images
during training and on any image at test time.

Follows:
  Turner, Tsipras and Madry, "Label-Consistent Backdoor Attacks", arXiv:1912.02771, 2019,
  and their release MadryLab/label-consistent-backdoor-code (poison_attack.py, b18d8ab);
  BackdoorBench (SCLBD/BackdoorBench at f02e353): attack/lc.py, utils/bd_img_transform/lc.py
  (the trigger), resource/label-consistent/craft_adv_dataset.py (the PGD images),
  config/attack/lc/default.yaml.

  - Trigger: BackdoorBench's default "all-corners" layout (the paper's four-corner trigger):
    in each corner of a 32x32 layout a 3x3 patch, rows (white, black, black), (black, white,
    black), (white, black, white) on the left-hand corners and mirrored left to right on the
    right-hand ones, every channel alike. `lc_corners="bottom_right"` is the release's
    config.json default (one patch). Other image sizes get the 32x32 layout resized
    nearest-neighbour, as BackdoorBench does. Amplitude 1 (BackdoorBench's
    `reduced_amplitude: 1`) sets the cells to 0 or 1.
  - PGD as craft_adv_dataset.py runs it: eps 8/255, step 1.5/255, 100 steps, no random start,
    the true labels' cross-entropy ascended, batches of 128. (BackdoorBench's attack/lc.py
    names its precomputed file with eps 16, but the crafting script uses 8; we follow the
    script.)

What differs:
  - The model attacked is the run's own vanilla model (the `perturb_poisoned` hook), not an
    adversarially trained ResNet-18 (BackdoorBench's `resnet18_PGD_best_model.pth`, and the
    paper's robust models), and the images are perturbed in the run, not loaded precomputed.
  - The perturbed images are rounded to uint8; BackdoorBench truncates (`(x * 255).uint8`),
    which biases every pixel down by half a grey level on average.
  - A reduced amplitude `a < 1` blends the patch in, `(1 - a) x + a p` (a `Trigger`), where the
    references add `+-a` and clip; both are the same at the default `a = 1`.
  - BackdoorBench stamps the stored images before augmentation; here `poison.stamp` decides
    (after augmentation by default, so the patches stay in the corners).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from linfjax import pixels, settings
from linfjax.attacks.base import Attack, CleanModel, TriggerError
from linfjax.attacks.mask_pattern import Trigger
from linfjax.settings import choice, fail, integer, number, spec

# BackdoorBench's craft_adv_dataset.py: pgd_config eps 8, alpha 1.5 (of 255), 100 steps, and
# the dataloader's batch size 128 (resource/label-consistent/default.yaml).
LC_EPS = 8 / 255
LC_STEP_SIZE = 1.5 / 255
LC_STEPS = 100
LC_BATCH_SIZE = 128
LC_AMPLITUDE = 1.0
# The top-left corner's 3x3 patch, +1 white and -1 black; the right-hand corners mirror it
# left to right (the reference lists all four cell by cell).
CORNER = np.array([[1, -1, -1], [-1, 1, -1], [1, -1, 1]], np.float32)
LAYOUT_SIZE = 32  # The references lay the trigger out on 32x32 images.
CORNERS = {"all": ("top_left", "top_right", "bottom_left", "bottom_right"),
           "bottom_right": ("bottom_right",)}
# Nearest-neighbour resizing keeps row 29 of the 32x32 layout (the far patches' first row)
# only when (side - 1) * 32 // side >= 29, that is side >= 11.
MIN_SIDE = 11


# A pixel-unit size or weight in (0, 1], checked while the trigger is LC's.
IN_UNIT = number(0.0, 1.0, low_open=True).when("kind", "lc")


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `trigger` block's fields of LC."""
  lc_eps: float = spec(LC_EPS, IN_UNIT, "LC's L-inf bound on the adversarial perturbation, "
                       "in [0, 1] pixel units.")
  lc_step_size: float = spec(LC_STEP_SIZE, IN_UNIT, "LC's PGD step size (times the sign of "
                             "the gradient).")
  lc_steps: int = spec(LC_STEPS, integer(0).when("kind", "lc"),
                       "LC's PGD steps on the clean model (0: the poisoned images unperturbed).")
  lc_batch_size: int = spec(LC_BATCH_SIZE, integer(1).when("kind", "lc"), "Images per PGD batch.")
  lc_amplitude: float = spec(LC_AMPLITUDE, IN_UNIT, "LC's trigger amplitude (1: the patch "
                             "cells are set to 0 or 1).")
  lc_corners: str = spec("all", choice(*CORNERS).when("kind", "lc"),
                         "LC's patches: in all four corners, or bottom-right only.")


def corner_signs(image_shape, corners: str = "all") -> np.ndarray:
  """[H, W]: +1 where the trigger is white, -1 where black, 0 elsewhere: the 32x32 layout
  resized nearest-neighbour to the image (as BackdoorBench does for other sizes)."""
  height, width = image_shape[:2]
  size, end = LAYOUT_SIZE, LAYOUT_SIZE - 3
  places = {"top_left": (0, 0, CORNER), "top_right": (0, end, CORNER[:, ::-1]),
            "bottom_left": (end, 0, CORNER), "bottom_right": (end, end, CORNER[:, ::-1])}
  layout = np.zeros((size, size), np.float32)
  for name in CORNERS[corners]:
    row, col, cells = places[name]
    layout[row:row + 3, col:col + 3] = cells
  rows = np.arange(height) * size // height
  cols = np.arange(width) * size // width
  return layout[rows][:, cols]


def lc_trigger(image_shape, *, corners: str = "all", amplitude: float = LC_AMPLITUDE) -> Trigger:
  """LC's corner patches as a mask-and-pattern trigger: mask `amplitude` on the cells, pattern
  1 on the white cells and 0 on the black ones, on every channel."""
  height, width, channels = image_shape
  if min(height, width) < MIN_SIDE:
    raise TriggerError(f"LC's corner patches need images of at least {MIN_SIDE}x{MIN_SIDE} "
                       f"(got {height}x{width})")
  if not 0.0 < amplitude <= 1.0:
    raise TriggerError(f"LC amplitude {amplitude} must be in (0, 1]")
  signs = corner_signs(image_shape, corners)
  mask = (amplitude * (signs != 0))[..., None].astype(np.float32)
  pattern = np.broadcast_to((signs > 0)[..., None], (height, width, channels)).astype(np.float32)
  return Trigger(jnp.asarray(mask), jnp.asarray(pattern))


def pgd_step(logits, originals: jax.Array, adversarial: jax.Array, labels: jax.Array, *,
             eps: float, step_size: float) -> jax.Array:
  """One step of untargeted L-inf PGD: up the sign of the gradient of the true labels'
  cross-entropy (summed, so each image's step is its own), then back into the eps ball
  around `originals` and into [0, 1]. Images float32 [B, H, W, C] in [0, 1]."""
  def loss(images):
    log_probs = jax.nn.log_softmax(logits(images))
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=1).sum()

  stepped = adversarial + step_size * jnp.sign(jax.grad(loss)(adversarial))
  return jnp.clip(originals + jnp.clip(stepped - originals, -eps, eps), 0.0, 1.0)


def perturb(values: Settings, clean_model: CleanModel, images: np.ndarray,
            labels: np.ndarray) -> np.ndarray:
  """The poisoned images after `lc_steps` PGD steps on the clean model, as uint8 pixels.

  Batches of `lc_batch_size` (the last one padded with copies of its last image, so one
  compiled loop serves them all).
  """
  images = np.asarray(images, np.uint8)
  if values.lc_steps == 0 or len(images) == 0:
    return images.copy()
  batch = min(values.lc_batch_size, len(images))

  @jax.jit
  def attack(originals, batch_labels):
    step = lambda _, adversarial: pgd_step(clean_model.logits, originals, adversarial,
                                           batch_labels, eps=values.lc_eps,
                                           step_size=values.lc_step_size)
    return jax.lax.fori_loop(0, values.lc_steps, step, originals)

  perturbed = np.empty_like(images)
  for start in range(0, len(images), batch):
    chunk, chunk_labels = images[start:start + batch], np.asarray(labels[start:start + batch])
    missing = batch - len(chunk)
    chunk = np.pad(chunk, ((0, missing), (0, 0), (0, 0), (0, 0)), mode="edge")
    chunk_labels = np.pad(chunk_labels, (0, missing), mode="edge").astype(np.int32)
    adversarial = attack(pixels.to_unit_float(chunk), jnp.asarray(chunk_labels))
    pixels_out = np.asarray(jnp.round(adversarial * 255.0), np.uint8)
    perturbed[start:start + batch] = pixels_out[:batch - missing]
  return perturbed


def _check_data(values: Settings, image_shape) -> None:
  height, width, _ = image_shape
  if min(height, width) < MIN_SIDE:
    fail("trigger", f"LC's corner patches need images of at least {MIN_SIDE}x{MIN_SIDE} "
         f"(got {height}x{width})")


LC = Attack(
    settings=Settings,
    build=lambda values, shape: lc_trigger(shape, corners=values.lc_corners,
                                           amplitude=values.lc_amplitude),
    check_data=_check_data, has_region=True, perturb_poisoned=perturb,
    description="LC: label-consistent, target-class images made hard by PGD on the clean "
                "model, with 3x3 corner patches",
    # BackdoorBench's LC: all four corners at full amplitude, PGD eps 8/255, step 1.5/255,
    # 100 steps; clean-label as published (target-class images, labels kept).
    preset=dict(kind="lc", lc_eps=LC_EPS, lc_step_size=LC_STEP_SIZE, lc_steps=LC_STEPS,
                lc_batch_size=LC_BATCH_SIZE, lc_amplitude=LC_AMPLITUDE, lc_corners="all",
                clean_label=True, cross_ratio=0.0))
