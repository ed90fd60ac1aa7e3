"""The GPU figures the README needs, in one command (benchmarks/gpu.sh runs it with the rest).

Measures, in one run, on JAX's default backend (a GPU; on CPU only at `--tiny` sizes, so
that CI keeps it working):
  1. a training epoch of PreActResNet-18 over `--images` CIFAR-shaped images, images/s:
     linfjax (uint8 data on the device, crop + flip + trigger inside the jitted, donated
     step) at fp32 batch 128 and bf16 batch 512, against a PyTorch peer on the same device:
     BackdoorBench's model (benchmarks/torch_preact_resnet.py) fed by a `DataLoader` with 4
     workers doing random crop (pad 4) and flip on the host (NumPy, BackdoorBench's
     transforms without PIL), fp32 batch 128, and bf16 batch 512 with autocast and
     channels_last. Compile and warm-up excluded. Skipped without PyTorch;
  2. lockstep (models vmapped over a runs axis: grouped convolutions) against sequential
     training steps: the small CNN x8 fp32 and x32 bf16, PreActResNet-18 x4 fp32;
  3. the whole pipeline (`python -m linfjax.main` with configs/cifar_patch.py, every
     stage) on the shared subset tiled to 50,000 training and 10,000 test images, with
     BackdoorBench's recipe (fp32, batch 128) and a bf16 recipe (bf16, batch 512, lr 0.04):
     `--epochs` epochs and `--reverse_steps` Neural Cleanse steps are measured, and the
     README's 100 epochs and 1,000 steps are EXTRAPOLATED linearly from them (an upper bound
     for Neural Cleanse, whose early stopping can end sooner).
MFU (benchmarks/mfu.py), Neural Cleanse vmapped against a loop (reverse.py) and the pruning
sweep (prune.py) are the other benchmarks of `run_all.py --gpu`.

Run on a GPU machine (from the repo root, ../shared beside it, `pip install -e '.[bench]'`
with a CUDA build of PyTorch):
  bash benchmarks/gpu.sh          # all GPU benchmarks, about 8 minutes on an H100/H200
  python benchmarks/gpu.py [--images=50000 --epochs=2 --reverse_steps=20]
  python benchmarks/gpu.py --tiny # CI, on CPU
"""

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from linfjax import config as config_lib
from linfjax import data as data_lib
from linfjax import models
from linfjax import attacks
from linfjax.attacks import poison
from linfjax.training import train
import lockstep_timing

_IMAGES = flags.DEFINE_integer("images", 50000, "images per timed epoch", lower_bound=1)
_EPOCHS = flags.DEFINE_integer("epochs", 2, "pipeline epochs measured (of 100)", lower_bound=1)
_REVERSE_STEPS = flags.DEFINE_integer("reverse_steps", 20, "Neural Cleanse steps measured "
                                      "(of 1,000)", lower_bound=1)
_TINY = flags.DEFINE_bool("tiny", False, "tiny sizes (CI, on CPU), not for figures")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SHAPE = (32, 32, 3)
FULL_EPOCHS, FULL_REVERSE_STEPS = 100, 1000
PIPELINE_TARGETS = {"fp32_b128": 400.0, "bf16_b512": 150.0}  # Seconds, the aims.


def _images(count: int):
  """The shared subset's training images tiled (repeated) to `count`, and their labels."""
  subset = data_lib.load_cifar10_dir(os.path.join(REPO, config_lib.SHARED_SUBSET))
  repeats = -(-count // len(subset.train_labels))
  images = np.tile(subset.train_images, (repeats, 1, 1, 1))[:count]
  labels = np.tile(subset.train_labels, repeats)[:count]
  return images, labels, subset


def linfjax_epoch(images, labels, batch: int, dtype: str, width: float) -> float:
  """Images/s of one epoch of linfjax's PreActResNet-18 step (after a compiling epoch)."""
  model = models.create("preact_resnet18", num_classes=10, width=width, dtype=jnp.dtype(dtype))
  steps = train.steps_per_epoch(len(labels), batch)
  state = train.create_state(model, models.init(model, jax.random.key(0), IMAGE_SHAPE),
                             train.make_optimizer(config_lib.base_config().train, 2 * steps))
  trigger = attacks.patch(IMAGE_SHAPE, size=3, row=29, col=29, pattern=np.ones(3, np.float32))
  data = train.to_device(poison.poison(images, labels, trigger, rate=0.1, target=0,
                                       mode="all_to_one", stamp="after_augmentation",
                                       num_classes=10, seed=0))
  key = jax.random.key(1)
  state, _ = train.train_epoch(state, data, trigger, key=key, epoch=0, batch_size=batch,
                               padding=4, flip=True)  # Compiles (and warms up).
  jax.block_until_ready(state)
  started = time.perf_counter()
  state, metrics = train.train_epoch(state, data, trigger, key=key, epoch=1, batch_size=batch,
                                     padding=4, flip=True)
  jax.block_until_ready(state)
  return steps * batch / (time.perf_counter() - started)


def torch_epoch(images, labels, batch: int, bf16: bool, workers: int) -> float:
  """Images/s of one epoch of the PyTorch peer (after a few warm-up batches)."""
  import torch
  import torch_preact_resnet

  class CropFlip(torch.utils.data.Dataset):
    """uint8 HWC images; random crop after 4-pixel zero padding and a random flip."""

    def __len__(self):
      return len(labels)

    def __getitem__(self, i):
      rng = np.random.default_rng()
      padded = np.pad(images[i], ((4, 4), (4, 4), (0, 0)))
      row, col = rng.integers(0, 9, 2)
      image = padded[row:row + 32, col:col + 32]
      if rng.random() < 0.5:
        image = image[:, ::-1]
      return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(labels[i])

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  loader = torch.utils.data.DataLoader(CropFlip(), batch_size=batch, shuffle=True,
                                       num_workers=workers, drop_last=True,
                                       pin_memory=device.type == "cuda",
                                       persistent_workers=workers > 0)
  model = torch_preact_resnet.PreActResNet18(num_classes=10).to(device).train()
  if bf16:
    model = model.to(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  mean = torch.tensor(models.CIFAR10_MEAN, device=device).reshape(1, 3, 1, 1)
  std = torch.tensor(models.CIFAR10_STD, device=device).reshape(1, 3, 1, 1)
  sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

  def epoch(limit=None):
    count = 0
    for step, (x, y) in enumerate(loader):
      if limit is not None and step == limit:
        break
      x = (x.to(device, non_blocking=True).float() / 255.0 - mean) / std
      if bf16:
        x = x.contiguous(memory_format=torch.channels_last)
      with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.cross_entropy(model(x), y.to(device, non_blocking=True))
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      count += len(y)
    sync()
    return count

  epoch(limit=3)
  started = time.perf_counter()
  count = epoch()
  return count / (time.perf_counter() - started)


def _write_cifar_dir(root: str, subset, train_count: int, test_count: int) -> str:
  """The subset tiled to `train_count` / `test_count` images, as a cifar-10-batches-py dir."""
  batch_dir = os.path.join(root, data_lib.CIFAR_BATCH_DIR)
  os.makedirs(batch_dir)
  with open(os.path.join(batch_dir, data_lib.CIFAR_META_FILE), "wb") as f:
    pickle.dump({"label_names": list(subset.class_names)}, f, protocol=2)
  tile = lambda a, n: np.tile(a, (-(-n // len(a)),) + (1,) * (a.ndim - 1))[:n]
  rows = lambda images: images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  train_images = tile(subset.train_images, train_count)
  train_labels = tile(subset.train_labels, train_count)
  parts = np.array_split(np.arange(train_count), len(data_lib.CIFAR_TRAIN_FILES))
  for name, part in zip(data_lib.CIFAR_TRAIN_FILES, parts):
    with open(os.path.join(batch_dir, name), "wb") as f:
      pickle.dump({"data": rows(train_images[part]),
                   "labels": [int(v) for v in train_labels[part]]}, f, protocol=2)
  with open(os.path.join(batch_dir, data_lib.CIFAR_TEST_FILE), "wb") as f:
    pickle.dump({"data": rows(tile(subset.test_images, test_count)),
                 "labels": [int(v) for v in tile(subset.test_labels, test_count)]}, f,
                protocol=2)
  return root


PIPELINE_CHILD = """
import json, sys, time
from linfjax.runs import compile_cache, pipeline
from linfjax import config as config_lib
compile_cache.enable("off")
config = config_lib.base_config()  # configs/cifar_patch.py: BadNets on the full config.
config.trigger.update(config_lib.TRIGGER_PRESETS["patch"])
config.update_from_flattened_dict(json.loads(sys.argv[1]))
walls = {}
for name, stage in list(pipeline.STAGES.items()):
  def timed(ctx, name=name, stage=stage):
    started = time.perf_counter()
    result = stage(ctx)
    walls[name] = time.perf_counter() - started
    return result
  pipeline.STAGES[name] = timed
started = time.perf_counter()
pipeline.run(config, sys.argv[2], progress=False)
print("WALLS " + json.dumps({"total": time.perf_counter() - started, **walls}))
"""


def pipeline_extrapolated(path: str, recipe: dict, epochs: int, reverse_steps: int,
                          tiny: bool) -> tuple[dict, float]:
  """Stage seconds measured with `epochs` / `reverse_steps`, and the extrapolated total."""
  overrides = {"data.source": "cifar10_dir", "data.path": path, "train.epochs": epochs,
               "reverse.steps": reverse_steps, "reverse.checkpoint_every": reverse_steps,
               "reverse.early_stop_patience": reverse_steps + 1, **recipe}
  if tiny:
    overrides.update({"model.width": 0.125, "data.clean_set_size": 100, "train.batch_size": 32,
                      "train.eval_batch_size": 50, "reverse.mini_batches": 1,
                      "reverse.batch_size": 16, "prune.fine_tune.epochs": 1})
  with tempfile.TemporaryDirectory(prefix="linfjax_gpu_run_") as workdir:
    completed = subprocess.run([sys.executable, "-c", PIPELINE_CHILD, json.dumps(overrides),
                                workdir], cwd=REPO, capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=REPO))
  if completed.returncode:
    raise RuntimeError(f"pipeline run failed:\n{completed.stderr[-3000:]}")
  line = [l for l in completed.stdout.splitlines() if l.startswith("WALLS ")][-1]
  walls = json.loads(line[len("WALLS "):])
  extrapolated = (walls["total"] + walls["train"] * (FULL_EPOCHS / epochs - 1)
                  + walls["reverse"] * (FULL_REVERSE_STEPS / reverse_steps - 1))
  return walls, extrapolated


def main(argv):
  del argv
  tiny = _TINY.value
  images_count = 64 if tiny else _IMAGES.value
  width = 0.125 if tiny else 1.0
  print(f"jax {jax.__version__}: backend {jax.default_backend()}, device "
        f"{jax.devices()[0].device_kind}{' (tiny sizes: not for figures)' if tiny else ''}")
  images, labels, subset = _images(images_count)
  ratios = []

  has_torch = importlib.util.find_spec("torch") is not None
  print(f"\n1. PreActResNet-18 epoch of {images_count} images, images/s")
  print("| what | linfjax | PyTorch peer (DataLoader, 4 workers) | ratio |")
  print("| --- | --- | --- | --- |")
  for label, batch, dtype in (("fp32_b128", 16 if tiny else 128, "float32"),
                              ("bf16_b512", 32 if tiny else 512, "bfloat16")):
    ours = linfjax_epoch(images, labels, batch, dtype, width)
    if has_torch:
      theirs = torch_epoch(images, labels, batch, bf16=dtype == "bfloat16",
                           workers=0 if tiny else 4)
      ratio = ours / theirs
      ratios.append((f"epoch_linfjax_vs_pytorch_{label}", ratio,
                     2.5 if label == "fp32_b128" else 7))
      print(f"| {label} | {ours:.0f} | {theirs:.0f} | {ratio:.2f} |", flush=True)
    else:
      print(f"| {label} | {ours:.0f} | skipped (no PyTorch) | - |", flush=True)

  print("\n2. lockstep against sequential training steps, seconds per step of all models")
  for name, replicas, dtype, batch in (("cnn", 8, "float32", 128), ("cnn", 32, "bfloat16", 128),
                                       ("preact_resnet18", 4, "float32", 128)):
    replicas = 2 if tiny else replicas
    sequential, together = lockstep_timing.lockstep_against_sequential(
        name, 16 if tiny else batch, replicas=replicas, steps=1 if tiny else 5, width=width,
        dtype=dtype)
    ratios.append((f"lockstep_vs_sequential_{name}_x{replicas}_{dtype}", sequential / together,
                   1))

  print(f"\n3. the whole pipeline on the subset tiled to full CIFAR-10 size: {_EPOCHS.value} "
        f"epochs and {_REVERSE_STEPS.value} NC steps measured, {FULL_EPOCHS} and "
        f"{FULL_REVERSE_STEPS} extrapolated")
  scratch = tempfile.mkdtemp(prefix="linfjax_gpu_data_")
  try:
    path = _write_cifar_dir(scratch, subset, 600 if tiny else 50000, 200 if tiny else 10000)
    recipes = {"fp32_b128": {},
               "bf16_b512": {"train.compute_dtype": "bfloat16", "train.batch_size": 512,
                             "train.learning_rate": 0.04}}
    if tiny:
      recipes["bf16_b512"]["train.batch_size"] = 64
    print("| recipe | train s | reverse s | analysis s | prune s | measured total s | "
          "extrapolated total s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, recipe in recipes.items():
      walls, total = pipeline_extrapolated(path, recipe, 1 if tiny else _EPOCHS.value,
                                           1 if tiny else _REVERSE_STEPS.value, tiny)
      print(f"| {label} | {walls['train']:.1f} | {walls['reverse']:.1f} | "
            f"{walls['analysis']:.1f} | {walls['prune']:.1f} | {walls['total']:.1f} | "
            f"{total:.0f} (extrapolated) |", flush=True)
      ratios.append((f"pipeline_full_size_{label}_target_s_over_extrapolated_s",
                     PIPELINE_TARGETS[label] / total, 1))
  finally:
    shutil.rmtree(scratch)
  for name, value, target in ratios:
    print(f"ratio {name} {value:.2f} target {target}")


if __name__ == "__main__":
  app.run(main)
