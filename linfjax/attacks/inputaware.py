"""Input-aware dynamic backdoor: a generated pattern and mask for each image.

`T(x) = x + m(x) * (g(x) - x)`: a pattern generator `g` and a mask generator `m`, both small
conv nets (encoder-decoder: `depth` levels of two 3x3 conv-BN-ReLU blocks and a 2x2 max-pool, a
middle block, then `depth` levels of bilinear upsampling and two blocks, the last without
ReLU), map the image to `tanh(out) / (2 + 1e-7) + 0.5` in [0, 1]; the mask is then sharpened
to almost 0 or 1 by `tanh(20 m - 10) / (2 + 1e-7) + 0.5`. Batch norm uses each batch's
statistics while the generators train and the running ones (momentum 0.05) in the trigger, as
the reference's nets in train and eval mode. Each image carries its own trigger. The noise
("cross") mode stamps each image with the pattern and mask generated from ANOTHER image of the
batch and keeps its true label, so that a pattern only triggers on the image it was made for.

Follows Nguyen and Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020, and its code
(VinAIResearch/input-aware-backdoor-attack-release: networks/models.py `Generator`, train.py
`create_bd`, `create_cross`, `train_mask_step`, `train_step`; config.py), as BackdoorBench
runs it (attack/inputaware.py at 3f4b1a9, config/attack/inputaware/default.yaml): Adam at
0.01 with betas (0.5, 0.9) for both generators, the mask net pre-trained alone for 25 epochs
(lr x0.1 at epochs 10 and 20) on `lambda_norm * mean(relu(m(x1) - density)) + lambda_div *
div(m)`, with `lambda_norm = 100`, `density = 0.032`, `lambda_div = 1`, `div = mean_i
||x1_i - x2_i|| / (||f(x1_i) - f(x2_i)|| + 1e-7)` (root mean squares over pixels, `x2` a second
shuffle of the data), and one cross example per poisoned one (`p_cross = p_attack`, so
`cross_ratio = 1`).

What differs:
  - No joint training. The reference trains the pattern generator together with the
    classifier. Here `prepare` trains it on the run's clean (vanilla) model, which is fixed,
    on `CE(f(T(x1)), y_t) + CE(f(x1 + m(x2) (g(x2) - x1)), y1) + lambda_div * div(g)` (the
    reference's generator loss: backdoor and cross examples at p_cross = p_attack, plus
    diversity) for `inputaware_epochs` epochs (ours, 5), after the mask pre-training; the
    backdoored model then trains with that fixed trigger, poisoned and cross examples as
    `attacks.poison` draws them. A fixed trigger is what every stage, defense and detector of
    linfjax evaluates (saved in train/prepared_attack.npz), which a generator still moving
    with the classifier would not give.
  - Smaller generators: `channels` 16 and `depth` 2 by default (the reference: 32 and 3 on
    CIFAR-10 and GTSRB, 16 and 2 on MNIST); upsampling to the encoder's own sizes (so any
    image side >= 2^depth works); inputs `2 x - 1` instead of the dataset's normalisation; no
    augmentation while preparing (the reference's loaders crop and rotate); the running batch
    statistics follow the first batch of each step once (the reference's, every forward
    call); the mask loss weighs `div` by `lambda_div` once (the reference multiplies it in
    twice; equal at its default 1); the pattern net's lr schedule (x0.1 from epoch 200) never
    applies within its epochs here.
  - The cross examples in a training step take their pattern from a random other image of the
    same batch (a random cyclic order, so never their own), which may itself be a poisoned,
    stamped one; the reference draws it from a second loader of clean images.
  - All-to-all runs stamp with the generator prepared towards `poison.target`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from linfjax import settings
from linfjax.attacks.base import Attack, CleanModel, TriggerError
from linfjax.settings import fail, integer, number, spec

EPSILON = 1e-7
BN_EPSILON, BN_MOMENTUM = 1e-5, 0.05  # The reference's BatchNorm2d(eps=1e-5, momentum=0.05).
# The reference's defaults (config.py; BackdoorBench's config/attack/inputaware/default.yaml).
LR = 0.01
BETAS = (0.5, 0.9)
LAMBDA_DIV = 1.0
LAMBDA_NORM = 100.0
MASK_DENSITY = 0.032
MASK_EPOCHS = 25  # BackdoorBench's clean_train_epochs: the mask net's pre-training.
MASK_MILESTONES = (10, 20)  # The mask net's lr x0.1 at these epochs.
BATCH_SIZE = 128
CROSS_RATIO = 1.0  # p_cross = p_attack = 0.1.
# Ours: smaller generators, and the epochs the pattern net trains on the fixed clean model.
CHANNELS = 16
DEPTH = 2
EPOCHS = 5


def layer_shapes(image_channels: int, out_channels: int, channels: int,
                 depth: int) -> list[tuple[int, int]]:
  """(in, out) channels of the generator's 3x3 convs, in order (4 depth + 1 of them)."""
  down, current, width = [], image_channels, channels
  for level in range(depth):
    down += [(current, width), (width, width)]
    current, width = width, width * 2 if level < depth - 1 else width
  layers = down + [(current, current)]
  for level in range(depth):
    last = level == depth - 1
    layers += [(current, current), (current, out_channels if last else current // 2)]
    current //= 2
  return layers


def init_generator(rng: np.random.Generator, image_channels: int, out_channels: int,
                   channels: int, depth: int) -> dict:
  """{"conv_NN": a 3x3 conv (He-normal "w" [3, 3, in, out], zero bias "b") and its batch norm
  (affine "scale" 1 and "offset" 0, running "mean" 0 and "var" 1), all [out] but "w"}."""
  params = {}
  for index, (fan_in, fan_out) in enumerate(
      layer_shapes(image_channels, out_channels, channels, depth)):
    scale = math.sqrt(2.0 / (9 * fan_in))
    zeros, ones = jnp.zeros((fan_out,), jnp.float32), jnp.ones((fan_out,), jnp.float32)
    params[f"conv_{index:02d}"] = {
        "w": jnp.asarray(rng.normal(0.0, scale, (3, 3, fan_in, fan_out)), jnp.float32),
        "b": zeros, "scale": ones, "offset": zeros, "mean": zeros, "var": ones}
  return params


def _block(layer: dict, x: jax.Array, stats: dict | None, name: str,
           relu: bool = True) -> jax.Array:
  """Conv, batch norm (the batch's statistics, recorded in `stats`, when training; the running
  ones otherwise), ReLU: the reference's Conv2dBlock."""
  y = jax.lax.conv_general_dilated(x, layer["w"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = y + layer["b"].reshape(1, 1, 1, -1)
  if stats is None:
    mean, var = layer["mean"], layer["var"]
  else:
    mean, var = jnp.mean(y, axis=(0, 1, 2)), jnp.var(y, axis=(0, 1, 2))
    count = y.size // y.shape[-1]
    stats[name] = {"mean": mean, "var": var * count / max(count - 1, 1)}
  y = (y - mean.reshape(1, 1, 1, -1)) * jax.lax.rsqrt(var.reshape(1, 1, 1, -1) + BN_EPSILON)
  y = y * layer["scale"].reshape(1, 1, 1, -1) + layer["offset"].reshape(1, 1, 1, -1)
  return jax.nn.relu(y) if relu else y


def generate(params: dict, images: jax.Array, stats: dict | None = None) -> jax.Array:
  """A generator's output for images [B, H, W, C] in [0, 1]: [B, H, W, out] in [0, 1]; with
  `stats` (a dict, filled with each layer's batch statistics), batch norm in training mode."""
  names = sorted(params)
  block = lambda index, x, relu=True: _block(params[names[index]], x, stats, names[index], relu)
  depth = (len(names) - 1) // 4
  x, sizes = 2.0 * images - 1.0, []
  for level in range(depth):
    x = block(2 * level + 1, block(2 * level, x))
    sizes.append(x.shape[1:3])
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  x = block(2 * depth, x)
  for level in range(depth):
    height, width = sizes[depth - 1 - level]
    x = jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear")
    x = block(2 * depth + 2 + 2 * level, block(2 * depth + 1 + 2 * level, x),
              relu=level < depth - 1)
  return jnp.tanh(x) / (2.0 + EPSILON) + 0.5


def _update_running(params: dict, stats: dict) -> dict:
  """PyTorch's running statistics: `(1 - momentum) running + momentum batch`."""
  return {name: {**layer, **{key: (1 - BN_MOMENTUM) * layer[key] + BN_MOMENTUM * stats[name][key]
                             for key in ("mean", "var")}}
          for name, layer in params.items()}


def threshold(masks: jax.Array) -> jax.Array:
  """The reference's sharpened mask: `tanh(20 m - 10) / (2 + 1e-7) + 0.5`."""
  return jnp.tanh(masks * 20.0 - 10.0) / (2.0 + EPSILON) + 0.5


def blend(images: jax.Array, patterns: jax.Array, masks: jax.Array) -> jax.Array:
  """`x + m (p - x)`: images and patterns [B, H, W, C], masks [B, H, W, 1]."""
  return images + masks * (patterns - images)


def cross(trigger: "InputAware", images: jax.Array, others: jax.Array) -> jax.Array:
  """`images` stamped with the patterns and masks generated from `others` (same shape)."""
  return blend(images, generate(trigger.pattern, others),
               threshold(generate(trigger.mask, others)))


def other_images(images: jax.Array, key: jax.Array) -> jax.Array:
  """Each image's partner in a random cyclic order of the batch: another image (B > 1)."""
  order = jax.random.permutation(key, images.shape[0])
  partner = jnp.zeros_like(order).at[order].set(jnp.roll(order, -1))
  return images[partner]


class InputAware(NamedTuple):
  """The input-aware trigger: the two generators' parameters, and the images' [H, W] (zeros,
  for the region's shape only), so a stack of triggers vmaps."""
  pattern: dict
  mask: dict
  shape: jax.Array

  def stamp(self, images: jax.Array) -> jax.Array:
    return cross(self, images, images)

  def region(self) -> jax.Array:
    """The whole image: the mask is generated anew for every image."""
    return jnp.ones(self.shape.shape[-2:], bool)

  def noise_mode(self, images: jax.Array, key: jax.Array) -> jax.Array:
    """The cross mode: each image stamped with another image's pattern and mask."""
    return cross(self, images, other_images(images, key))


def _field(default, rule: settings.Rule, doc: str):
  """A field of this attack: checked while `kind` is 'inputaware'."""
  return spec(default, rule.when("kind", "inputaware"), f"Input-aware: {doc}")


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """The `trigger` block's fields of the input-aware attack."""
  inputaware_channels: int = _field(CHANNELS, integer(1), "the generators' first conv width "
                                    "(doubling with each level; the reference's 32).")
  inputaware_depth: int = _field(DEPTH, integer(1),
                                 "the generators' down/up levels (the reference's 3).")
  inputaware_seed: int = _field(0, integer(0), "seed of the generators' initial weights.")
  inputaware_mask_epochs: int = _field(MASK_EPOCHS, integer(0),
                                       "epochs the mask net pre-trains alone.")
  inputaware_epochs: int = _field(EPOCHS, integer(0),
                                  "epochs the pattern net trains on the clean model.")
  inputaware_batch_size: int = _field(BATCH_SIZE, integer(2),
                                      "batch size of the generators' training.")
  inputaware_lr: float = _field(LR, number(0.0, 10.0, low_open=True),
                                "Adam's learning rate for both generators.")
  inputaware_lambda_div: float = _field(LAMBDA_DIV, number(0.0, 1e4),
                                        "weight of the diversity loss.")
  inputaware_lambda_norm: float = _field(LAMBDA_NORM, number(0.0, 1e6),
                                         "weight of the mask's size loss.")
  inputaware_mask_density: float = _field(MASK_DENSITY, number(0.0, 1.0),
                                          "the mask's size loss is mean(relu(m - density)) "
                                          "over its pixels.")


def inputaware(image_shape, *, channels: int = CHANNELS, depth: int = DEPTH,
               seed: int = 0) -> InputAware:
  """Freshly initialised generators for images of `image_shape` (H, W, C), fixed by `seed`."""
  height, width, image_channels = image_shape
  if channels < 1 or depth < 1 or min(height, width) < 2 ** depth:
    raise TriggerError(f"input-aware generators of width {channels} and depth {depth} need "
                       f"width >= 1, depth >= 1 and images of side >= 2^depth (got "
                       f"{height}x{width})")
  rng = np.random.default_rng(seed)
  return InputAware(init_generator(rng, image_channels, image_channels, channels, depth),
                    init_generator(rng, image_channels, 1, channels, depth),
                    jnp.zeros((height, width), jnp.float32))


def _check_data(values: Settings, image_shape) -> None:
  height, width = image_shape[:2]
  if min(height, width) < 2 ** values.inputaware_depth:
    fail("trigger.inputaware_depth", f"{values.inputaware_depth} levels halve the "
         f"{height}x{width} image below one pixel")


def _distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per example root mean square difference (kept above 0 so its gradient stays finite)."""
  return jnp.sqrt(jnp.maximum(jnp.mean((a - b) ** 2, axis=(1, 2, 3)), 1e-12))


def diversity(x1: jax.Array, x2: jax.Array, out1: jax.Array, out2: jax.Array) -> jax.Array:
  """The reference's diversity loss: mean `||x1 - x2|| / (||out1 - out2|| + 1e-7)`."""
  return jnp.mean(_distance(x1, x2) / (_distance(out1, out2) + EPSILON))


def _train(params, loss, data: jax.Array, key: jax.Array, *, epochs: int, batch_size: int,
           schedule) -> dict:
  """Adam (betas 0.5, 0.9) on `loss(params, x1, y1, x2) -> (value, batch statistics of x1)`
  over pairs of batches from two shuffles of `data` (uint8 images, labels) per epoch (the last
  partial batch dropped); the running statistics follow each step's (the running "mean" and
  "var" have no gradient, so Adam leaves them)."""
  count = data[0].shape[0]
  steps = count // batch_size
  if epochs == 0 or steps == 0:
    return params
  optimizer = optax.adam(schedule(steps), b1=BETAS[0], b2=BETAS[1])

  @jax.jit
  def step(params, state, data, first, second):
    images, labels = data
    x1 = images[first].astype(jnp.float32) / 255.0
    x2 = images[second].astype(jnp.float32) / 255.0
    grads, stats = jax.grad(loss, has_aux=True)(params, x1, labels[first], x2)
    updates, state = optimizer.update(grads, state, params)
    return _update_running(optax.apply_updates(params, updates), stats), state

  state = optimizer.init(params)
  for epoch in range(epochs):
    orders = jax.random.split(jax.random.fold_in(key, epoch))
    first, second = (jax.random.permutation(k, count)[:steps * batch_size].reshape(steps, -1)
                     for k in orders)
    for index in range(steps):
      params, state = step(params, state, data, first[index], second[index])
  return params


def prepare(values: Settings, trigger: InputAware, clean_model: CleanModel) -> InputAware:
  """The mask net pre-trained alone, then the pattern net trained on the fixed clean model."""
  data = (jnp.asarray(clean_model.images), jnp.asarray(clean_model.labels, jnp.int32))
  mask_key, pattern_key = jax.random.split(clean_model.key)
  lr, lambda_div = values.inputaware_lr, values.inputaware_lambda_div

  def mask_loss(mask, x1, _, x2):
    stats = {}
    m1, m2 = threshold(generate(mask, x1, stats)), threshold(generate(mask, x2, {}))
    size = jnp.mean(jax.nn.relu(m1 - values.inputaware_mask_density))
    return (values.inputaware_lambda_norm * size + lambda_div * diversity(x1, x2, m1, m2),
            stats)

  mask_schedule = lambda steps: optax.piecewise_constant_schedule(
      lr, {epoch * steps: 0.1 for epoch in MASK_MILESTONES})
  mask = _train(trigger.mask, mask_loss, data, mask_key, epochs=values.inputaware_mask_epochs,
                batch_size=values.inputaware_batch_size, schedule=mask_schedule)
  target = clean_model.target

  def pattern_loss(pattern, x1, y1, x2):
    stats = {}
    p1, p2 = generate(pattern, x1, stats), generate(pattern, x2, {})
    stamped = blend(x1, p1, threshold(generate(mask, x1)))
    crossed = blend(x1, p2, threshold(generate(mask, x2)))
    ce = optax.softmax_cross_entropy_with_integer_labels
    backdoor = ce(clean_model.logits(stamped), jnp.full_like(y1, target)).mean()
    kept = ce(clean_model.logits(crossed), y1).mean()
    return backdoor + kept + lambda_div * diversity(x1, x2, p1, p2), stats

  pattern = _train(trigger.pattern, pattern_loss, data, pattern_key,
                   epochs=values.inputaware_epochs, batch_size=values.inputaware_batch_size,
                   schedule=lambda steps: lr)
  return trigger._replace(pattern=pattern, mask=mask)


INPUTAWARE = Attack(
    settings=Settings, check_data=_check_data, prepare=prepare, has_noise_mode=True,
    build=lambda values, shape: inputaware(shape, channels=values.inputaware_channels,
                                           depth=values.inputaware_depth,
                                           seed=values.inputaware_seed),
    description="Input-aware: a per-image pattern and mask from two small generators, "
                "trained on the clean model, with a cross mode",
    # The reference's losses and mask density, one cross example per poisoned one.
    preset=dict(kind="inputaware", inputaware_channels=CHANNELS, inputaware_depth=DEPTH,
                inputaware_seed=0, inputaware_mask_epochs=MASK_EPOCHS,
                inputaware_epochs=EPOCHS, inputaware_batch_size=BATCH_SIZE, inputaware_lr=LR,
                inputaware_lambda_div=LAMBDA_DIV, inputaware_lambda_norm=LAMBDA_NORM,
                inputaware_mask_density=MASK_DENSITY, clean_label=False,
                cross_ratio=CROSS_RATIO))
