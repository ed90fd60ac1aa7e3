"""TrojanNN: a square patch whose pattern is optimised on the clean model to excite its neurons.

`T(x) = (1 - m) * x + m * p` (a `mask_pattern.Trigger`), `m` 1 on a `trojannn_size` square at a
corner, `trojannn_margin` pixels in from both edges, `p` white at first. The `prepare` hook
sets `p` inside the square on the run's vanilla model (`features`: its last conv map, K
channels), with `a_k(x)` the mean over the map of channel k (the pooled feature a GAP head
reads) and `X` `trojannn_images` clean training images drawn with the attack's key:
  1. neurons: the `trojannn_neurons` channels whose mean activation over `X` is most sensitive to
     the pattern, the largest `|| d mean_x a_k(T(x)) / d p ||_1` at the white start (ties: the
     lower channel), so the channels the square can move most;
  2. the pattern: `trojannn_steps` signed-gradient steps of `trojannn_step_size` on TrojanNN's
     `L(p) = mean_x sum_k (v - a_k(T(x)))^2`, `v = trojannn_target`, each projected onto
     `|p - p_start| <= trojannn_epsilon` and [0, 1], inside the square only (outside it `p` keeps
     its zeros, and `m` hides it anyway).
Poisoning is BadNets': dirty-label, all-to-one (the `poison` block; BackdoorBench's pratio 0.1,
target 0 are its defaults).

Follows Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018, as BackdoorBench runs it
(attack/trojannn.py at f02e353: `get_most_connected_neuron_idxes`,
`pgd_with_mask_to_selected_neuron`; config/attack/trojannn/preactresnet18.yaml: 2 neurons,
target value 100, 1000 iterations; step 0.1 and eps 0.3 are that function's defaults; the masks
resource/trojannn/*.png are white shapes of about 100 pixels at 32x32, square.png a 10x10 square
2 pixels in from the bottom-right corner). What differs:
  - which neurons: the reference takes the inputs of the linear head (the pooled last conv map)
    whose summed |weight| to the logits is largest, TrojanNN's most connected neurons; a
    `CleanModel` gives no weights, so the channels are ranked by the gradient rule of step 1;
  - the loss: the reference's is on the mask image alone (black outside, a batch of one, summed);
    here it is on the square stamped on clean images, averaged over them;
  - the reference stops once the loss is below 1e-3 (never, with v = 100); here all steps run;
  - the trigger: the reference adds the optimised mask image to the image (in uint8, so sums over
    255 wrap before its clip) and optimises the pixels of its mask image that are not black (the
    apple by default); here the square's pixels are replaced (BadNets' stamp), so the region is
    the square (square.png's place and size);
  - the paper retrains the pretrained model on reverse-engineered inputs; like BackdoorBench,
    the backdoored model trains from scratch on the poisoned set.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from linfjax import pixels, settings
from linfjax.attacks.base import Attack, CleanModel, TriggerError
from linfjax.attacks.mask_pattern import PATCH_CORNERS, Trigger, patch
from linfjax.settings import choice, fail, integer, number, spec

Features = Callable[[jax.Array], jax.Array]
TROJANNN_SIZE = 10
TROJANNN_MARGIN = 2
TROJANNN_NEURONS = 2
TROJANNN_TARGET = 100.0
TROJANNN_STEPS = 1000
TROJANNN_STEP_SIZE = 0.1
TROJANNN_EPSILON = 0.3
TROJANNN_IMAGES = 64


def _when(rule):
  return rule.when("kind", "trojannn")


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `trigger` block's fields of TrojanNN."""
  trojannn_size: int = spec(TROJANNN_SIZE, _when(integer(1)),
                            "TrojanNN's square side in pixels (square.png's 10 at 32x32).")
  trojannn_position: str = spec("bottom_right", _when(choice(*PATCH_CORNERS)),
                                "The corner TrojanNN's square sits at.")
  trojannn_margin: int = spec(TROJANNN_MARGIN, _when(integer(0)),
                              "Pixels between TrojanNN's square and the image edges at its "
                              "corner.")
  trojannn_neurons: int = spec(TROJANNN_NEURONS, _when(integer(1)),
                               "Channels of the clean model's last conv map TrojanNN drives.")
  trojannn_target: float = spec(TROJANNN_TARGET, _when(number(0.0, 1e6, low_open=True)),
                                "The mean activation TrojanNN drives its channels to.")
  trojannn_steps: int = spec(TROJANNN_STEPS, _when(integer(1)),
                             "Signed-gradient steps on TrojanNN's pattern.")
  trojannn_step_size: float = spec(TROJANNN_STEP_SIZE, _when(number(0.0, 1.0, low_open=True)),
                                   "Size of each step, in [0, 1] pixel units.")
  trojannn_epsilon: float = spec(TROJANNN_EPSILON, _when(number(0.0, 1.0, low_open=True)),
                                 "Largest change of a pattern pixel from its white start.")
  trojannn_images: int = spec(TROJANNN_IMAGES, _when(integer(1)),
                              "Clean training images the pattern is optimised on.")


def _corner(values: Settings, image_shape) -> tuple[int, int]:
  """The square's top-left pixel: `trojannn_margin` in from both edges at its corner."""
  height, width, _ = image_shape
  size, margin, position = values.trojannn_size, values.trojannn_margin, values.trojannn_position
  row = margin if position.startswith("top") else height - size - margin
  col = margin if position.endswith("left") else width - size - margin
  return row, col


def build(values: Settings, image_shape) -> Trigger:
  """The square, white (the start of `prepare`'s optimisation)."""
  row, col = _corner(values, image_shape)
  return patch(image_shape, size=values.trojannn_size, row=row, col=col,
               pattern=np.ones(image_shape[-1:], np.float32))


def channel_means(features: Features, trigger: Trigger, images: jax.Array) -> jax.Array:
  """[B, K]: the mean over the map of each channel of `features(T(images))`."""
  return jnp.mean(features(trigger.stamp(images)), axis=(1, 2))


def sensitivity(features: Features, trigger: Trigger, images: jax.Array) -> jax.Array:
  """[K]: `|| d mean_x a_k(T(x)) / d p ||_1`, one backward pass per channel."""
  means = lambda pattern: jnp.mean(channel_means(features, trigger._replace(pattern=pattern),
                                                 images), axis=0)
  channels, vjp = jax.vjp(means, trigger.pattern)
  ones = jnp.eye(channels.shape[0], dtype=channels.dtype)
  return jax.lax.map(lambda row: jnp.sum(jnp.abs(vjp(row)[0])), ones, batch_size=8)


def select_neurons(features: Features, trigger: Trigger, images: jax.Array,
                   count: int) -> np.ndarray:
  """The `count` channels of largest `sensitivity`, largest first (ties: the lower index)."""
  scores = np.asarray(jax.jit(sensitivity, static_argnums=0)(features, trigger, images))
  if count > len(scores):
    raise TriggerError(f"trojannn_neurons {count} is more than the {len(scores)} channels of "
                       "the clean model's last conv map")
  return np.argsort(-scores, kind="stable")[:count]


def neuron_loss(features: Features, trigger: Trigger, images: jax.Array, neurons,
                target_value: float) -> jax.Array:
  """TrojanNN's `mean_x sum_k (v - a_k(T(x)))^2` over the chosen channels."""
  chosen = channel_means(features, trigger, images)[:, jnp.asarray(neurons)]
  return jnp.mean(jnp.sum((target_value - chosen) ** 2, axis=1))


def optimise_pattern(features: Features, trigger: Trigger, images: jax.Array, neurons, *,
                     target_value: float, steps: int, step_size: float,
                     epsilon: float) -> Trigger:
  """`steps` signed-gradient steps on `neuron_loss`, projected onto `|p - p_start| <= epsilon`
  and [0, 1], inside the mask only."""
  start, inside = trigger.pattern, trigger.mask > 0
  grad = jax.grad(lambda pattern: neuron_loss(features, trigger._replace(pattern=pattern),
                                              images, neurons, target_value))

  def step(_, pattern):
    moved = pattern - step_size * jnp.sign(grad(pattern))
    moved = jnp.clip(jnp.clip(moved, start - epsilon, start + epsilon), 0.0, 1.0)
    return jnp.where(inside, moved, pattern)

  pattern = jax.jit(lambda p: jax.lax.fori_loop(0, steps, step, p))(start)
  return trigger._replace(pattern=pattern)


def attack_images(values: Settings, clean_model: CleanModel) -> jax.Array:
  """The `trojannn_images` clean training images (float [0, 1]) drawn with the attack's key."""
  count = min(values.trojannn_images, len(clean_model.images))
  chosen = np.sort(np.asarray(jax.random.choice(clean_model.key, len(clean_model.images),
                                                (count,), replace=False)))
  return pixels.to_unit_float(np.asarray(clean_model.images)[chosen])


def prepare(values: Settings, built: Trigger, clean_model: CleanModel) -> Trigger:
  """TrojanNN's neurons, then its pattern, on the clean model (see the module docstring)."""
  images = attack_images(values, clean_model)
  neurons = select_neurons(clean_model.features, built, images, values.trojannn_neurons)
  return optimise_pattern(clean_model.features, built, images, neurons,
                          target_value=values.trojannn_target, steps=values.trojannn_steps,
                          step_size=values.trojannn_step_size, epsilon=values.trojannn_epsilon)


def _check_data(values: Settings, image_shape) -> None:
  height, width, _ = image_shape
  side = values.trojannn_size + values.trojannn_margin
  if side > height or side > width:
    fail("trigger.trojannn_size", f"a {values.trojannn_size}x{values.trojannn_size} square "
         f"{values.trojannn_margin} pixels in from the edges does not fit a {height}x{width} "
         "image")


TROJANNN = Attack(
    settings=Settings, build=build, check_data=_check_data, has_region=True, prepare=prepare,
    description="TrojanNN: a square patch optimised on the clean model to drive chosen neurons "
                "of its last conv map high",
    # BackdoorBench's preactresnet18 settings (2 neurons to 100, 1000 steps of 0.1 within 0.3
    # of white), its square mask's size and place; dirty-label, all-to-one.
    preset=dict(kind="trojannn", trojannn_size=TROJANNN_SIZE, trojannn_position="bottom_right",
                trojannn_margin=TROJANNN_MARGIN, trojannn_neurons=TROJANNN_NEURONS,
                trojannn_target=TROJANNN_TARGET, trojannn_steps=TROJANNN_STEPS,
                trojannn_step_size=TROJANNN_STEP_SIZE, trojannn_epsilon=TROJANNN_EPSILON,
                trojannn_images=TROJANNN_IMAGES, clean_label=False, cross_ratio=0.0))
