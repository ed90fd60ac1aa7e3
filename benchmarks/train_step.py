"""Training throughput: linfjax's step against PyTorch, and an epoch in one `lax.scan`.

Measures, in one run, on whatever JAX's default backend and PyTorch's device are:
  1. images/s of linfjax's `preact_resnet18` training step (`train.compiled_step`: jitted,
     donated, uint8 data on the device, crop+flip and trigger stamping inside the step)
     against the same PreActResNet-18 in plain PyTorch (`torch_preact_resnet.py`: SGD lr
     0.01, momentum 0.9, weight decay 5e-4, crop+flip on tensors), fp32, batch 128;
  2. images/s of the small `cnn` trained for `--epoch_steps` steps as a Python loop over the
     jitted, donated step against the same steps inside one jitted `lax.scan`, and the
     scan's compile time (on XLA:CPU the scan was 57x slower, docs/benchmarks.md).
Compile time is excluded from every images/s figure. The output ends with one line per
ratio, `ratio NAME VALUE target TARGET`.

Run:
  pip install -e .[bench]
  python benchmarks/train_step.py [--steps=8 --warmup=2 --epoch_steps=2]

The numbers are specific to the machine, its load and the library versions. It takes about
three minutes on 2 idle CPU cores (a scan step of the small CNN takes ~20 s there, hence the
small --epoch_steps), and seconds on a GPU, where a larger --steps gives steadier figures.
"""

import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.nn import functional as F

from linfjax import config as config_lib
from linfjax import models
from linfjax import attacks
from linfjax.attacks import poison
from linfjax.training import train
import torch_preact_resnet

_STEPS = flags.DEFINE_integer("steps", 8, "timed training steps per framework (PreActResNet-18)",
                              lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps first (the first one compiles)",
                               lower_bound=1)
_EPOCH_STEPS = flags.DEFINE_integer(
    "epoch_steps", 2, "steps of the small CNN, as a Python loop and inside one lax.scan",
    lower_bound=1)

BATCH = 128
IMAGE_SHAPE = (32, 32, 3)
PADDING = 4


def _dataset(num_batches: int) -> poison.PoisonedSet:
  """Random uint8 CIFAR-shaped images and labels, enough for `num_batches` batches."""
  rng = np.random.default_rng(0)
  n = num_batches * BATCH
  images = rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)
  return poison.clean(images, rng.integers(0, 10, n))


def _jax_state(name: str, total_steps: int) -> train.TrainState:
  """A fresh state for model `name` with the base config's SGD (BackdoorBench's recipe)."""
  model = models.create(name, num_classes=10)
  variables = models.init(model, jax.random.key(0), IMAGE_SHAPE)
  return train.create_state(model, variables,
                            train.make_optimizer(config_lib.base_config().train, total_steps))


def _time_jax_steps(state, data, batches, trigger, key, warmup: int) -> tuple[float, float]:
  """(seconds of the first call, which compiles; seconds of the steps after `warmup`)."""
  step = train.compiled_step(PADDING, True)
  start = time.perf_counter()
  for i, batch_indices in enumerate(batches):
    if i == warmup:
      jax.block_until_ready(state)
      start = time.perf_counter()
    state, metrics = step(state, data, batch_indices, trigger, key)
    if i == 0:
      jax.block_until_ready(state)
      first = time.perf_counter() - start
  jax.block_until_ready((state, metrics))
  return first, time.perf_counter() - start


def _torch_augment(images: torch.Tensor) -> torch.Tensor:
  """Random crop after zero padding and a random flip, per example: [B, C, H, W] float."""
  batch, channels, height, width = images.shape
  device = images.device
  padded = F.pad(images, (PADDING,) * 4)
  offsets = torch.randint(0, 2 * PADDING + 1, (batch, 2), device=device)
  rows = (offsets[:, :1] + torch.arange(height, device=device))[:, None, :, None]
  cols = (offsets[:, 1:] + torch.arange(width, device=device))[:, None, None, :]
  cropped = padded[torch.arange(batch, device=device)[:, None, None, None],
                   torch.arange(channels, device=device)[None, :, None, None], rows, cols]
  flips = torch.rand(batch, 1, 1, 1, device=device) < 0.5
  return torch.where(flips, cropped.flip(3), cropped)


def _time_torch_steps(device, training_set, trigger, batches, warmup: int) -> float:
  """Seconds of the PyTorch steps after `warmup`, with the same data and work per step."""
  to_nchw = lambda a: torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].to(device)
  images = torch.as_tensor(training_set.images).permute(0, 3, 1, 2).contiguous().to(device)
  labels = torch.as_tensor(training_set.labels, dtype=torch.long).to(device)
  stamp = torch.as_tensor(training_set.stamp_after_augmentation).to(device)
  mask, pattern = to_nchw(trigger.mask), to_nchw(trigger.pattern)
  mean = torch.tensor(models.CIFAR10_MEAN, device=device).reshape(1, 3, 1, 1)
  std = torch.tensor(models.CIFAR10_STD, device=device).reshape(1, 3, 1, 1)
  model = torch_preact_resnet.PreActResNet18(num_classes=10).to(device).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
  for i, batch_indices in enumerate(batches):
    if i == warmup:
      sync()
      start = time.perf_counter()
    index = torch.as_tensor(batch_indices, device=device)
    x = _torch_augment(images[index].float() / 255.0)
    x = torch.where(stamp[index][:, None, None, None], (1 - mask) * x + mask * pattern, x)
    loss = F.cross_entropy(model((x - mean) / std), labels[index])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
  loss.item()
  sync()
  return time.perf_counter() - start


def _scan_steps(state, data, batches, trigger, key):
  """The loop's steps inside one `lax.scan`: batches [steps, B] -> (state, losses [steps])."""
  def body(state, batch_indices):
    state, metrics = train.train_step(state, data, batch_indices, trigger, key,
                                      padding=PADDING, flip=True)
    return state, metrics["loss"]
  return jax.lax.scan(body, state, batches)


def _loop_vs_scan(trigger, key) -> dict:
  """Times the small CNN's steps as a Python loop and as one scan, from the same state."""
  steps = _EPOCH_STEPS.value
  data = train.to_device(_dataset(steps))
  batches = np.asarray(train.epoch_batches(jax.random.key(2), steps * BATCH, BATCH))
  state = _jax_state("cnn", steps)
  warm_state, scan_state = jax.tree.map(jnp.copy, state), jax.tree.map(jnp.copy, state)
  step = train.compiled_step(PADDING, True)
  jax.block_until_ready(step(warm_state, data, batches[0], trigger, key))
  start = time.perf_counter()
  losses = []
  for batch_indices in batches:
    state, metrics = step(state, data, batch_indices, trigger, key)
    losses.append(metrics["loss"])
  jax.block_until_ready((state, losses))
  loop_seconds = time.perf_counter() - start

  start = time.perf_counter()
  scan = jax.jit(_scan_steps, donate_argnums=0).lower(
      scan_state, data, batches, trigger, key).compile()
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  scan_state, scan_losses = jax.block_until_ready(scan(scan_state, data, batches, trigger, key))
  scan_seconds = time.perf_counter() - start
  return {"loop": steps * BATCH / loop_seconds, "scan": steps * BATCH / scan_seconds,
          "scan_compile_s": compile_seconds,
          "loss_gap": float(np.max(np.abs(np.asarray(losses) - np.asarray(scan_losses))))}


def main(argv):
  del argv
  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch_name = (torch.cuda.get_device_name() if torch_device.type == "cuda"
                else f"cpu, {torch.get_num_threads()} threads")
  print(f"jax {jax.__version__}: backend {jax.default_backend()}, device "
        f"{jax.devices()[0].device_kind}; torch {torch.__version__}: {torch_name}; "
        f"{cores} cores")

  warmup, steps = _WARMUP.value, _STEPS.value
  training_set = _dataset(warmup + steps)
  data = train.to_device(training_set)
  trigger = attacks.patch(IMAGE_SHAPE, size=3, row=29, col=29, pattern=np.ones(3))
  key = jax.random.key(1)
  batches = np.array(train.epoch_batches(jax.random.key(2), (warmup + steps) * BATCH, BATCH))
  state = _jax_state("preact_resnet18", warmup + steps)
  compile_seconds, jax_seconds = _time_jax_steps(state, data, batches, trigger, key, warmup)
  torch_seconds = _time_torch_steps(torch_device, training_set, trigger, batches, warmup)
  jax_rate, torch_rate = steps * BATCH / jax_seconds, steps * BATCH / torch_seconds
  epoch = _loop_vs_scan(trigger, key)

  print(f"\n| what (fp32, batch {BATCH}) | images/s |")
  print("| --- | --- |")
  print(f"| preact_resnet18, linfjax step | {jax_rate:.1f} |")
  print(f"| preact_resnet18, PyTorch | {torch_rate:.1f} |")
  print(f"| cnn, {_EPOCH_STEPS.value} steps as a Python loop of the jitted step "
        f"| {epoch['loop']:.1f} |")
  print(f"| cnn, the same steps in one lax.scan | {epoch['scan']:.1f} |")
  print(f"\npreact_resnet18 first step (compile) {compile_seconds:.1f} s; cnn scan compile "
        f"{epoch['scan_compile_s']:.1f} s; max |loss| gap loop vs scan {epoch['loss_gap']:.2g}")
  print(f"ratio train_step_linfjax_vs_pytorch {jax_rate / torch_rate:.2f} target 1.2")
  print(f"ratio epoch_python_loop_vs_scan {epoch['loop'] / epoch['scan']:.2f} target 1.0")


if __name__ == "__main__":
  app.run(main)
