"""BackdoorBench's BadNets row (CIFAR-10, PreActResNet-18, 10 % poisoning) beside linfjax's.

  python benchmarks/backdoorbench_row.py --compare=RUN_DIR
      reads a finished run's RUN_DIR/results.json and prints one Markdown table row per
      defense of BackdoorBench's leaderboard row: its C-Acc / ASR, linfjax's CA / ASR on the
      test split (`prune.synthetic.<name>`: CA and ASR_real; "no defense": `train.backdoored`)
      and linfjax minus BackdoorBench, in percentage points. A defense that did not run, or
      that linfjax does not have, gets a row that says why.
  python benchmarks/backdoorbench_row.py --run --data_dir=DIR --workdir=RUN_DIR
      checks DIR (the full CIFAR-10 in the cifar-10-batches-py layout, as
      `python -m linfjax.fetch DIR` writes it), runs
      `python -m linfjax.main --config=configs/cifar_patch.py:backdoorbench` on it with every
      defense of the row that linfjax has, then prints the comparison (also written to
      RUN_DIR/backdoorbench_row.md). Rerunning resumes the run. A GPU job: the recipe trains two
      PreActResNet-18s for 100 epochs each, then Neural Cleanse and the defenses; no GPU has
      timed it yet (benchmarks/gpu.sh --backdoorbench-row).
A bad input (no data directory, missing batch files, not the full set, no --workdir, no
results.json) ends in one line on stderr and exit status 2, with nothing written.

BackdoorBench's figures are its leaderboard's for this row, as issue 23 quotes them; its
defenses ran on BackdoorBench's own code and recipe, linfjax's on the `backdoorbench`
protocol (linfjax/config, PROTOCOLS), so the differences measure both the implementations
and the remaining differences of recipe each defense's module lists. No ratio lines: this
row has no target, only the reference figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/cifar_patch.py:backdoorbench"
# (BackdoorBench's name, linfjax's registry name or None, C-Acc %, ASR %, why when None).
ROW = (
    ("no defense", "", 91.32, 95.03, ""),
    ("FT", "fine_tuning", 89.96, 1.48, ""),
    ("FP", "fine_pruning", 91.31, 57.13, ""),
    ("NC", "nc_unlearning", 89.05, 1.27, ""),
    ("ANP", "anp", 84.17, 0.73, ""),
    ("CLP", "clp", 90.07, 77.56, ""),
    ("NAD", "nad", 89.87, 2.14, ""),
    ("i-BAU", "ibau", 89.16, 1.29, ""),
    ("ABL", None, 83.32, 0.00, "a training-time defense (it trains the model itself)"),
)
# The setting of BackdoorBench's row, as config.json fields; a run that differs is flagged.
SETTING = {"protocol": "backdoorbench", "model.name": "preact_resnet18", "train.epochs": 100,
           "poison.rate": 0.1, "poison.mode": "all_to_one", "trigger.kind": "patch",
           "poison.target": 0}
BATCH_FILES = ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
FULL_BATCH_BYTES = 10000 * 3072  # A full set's batch holds 10,000 images of 3,072 bytes.



class InputError(Exception):
  """A bad input, reported as one line with exit status 2."""


def registry() -> dict:
  """linfjax's defenses by name (imported here: it brings in JAX)."""
  from linfjax import defenses
  return defenses.DEFENSES


def applicable(known) -> tuple[str, ...]:
  """The row's defenses that `known` (a registry or names) has, in the row's order."""
  return tuple(name for _, name, *_ in ROW if name and name in known)


def run_argv(data_dir: str, workdir: str, known, python: str = sys.executable) -> list[str]:
  """The `python -m linfjax.main` command line of the row: the row's config on `data_dir`
  with every defense of the row that `known` has."""
  return [python, "-m", "linfjax.main", f"--config={CONFIG}", f"--workdir={workdir}",
          "--config.data.source=cifar10_dir", f"--config.data.path={data_dir}",
          f"--config.prune.defenses={applicable(known)!r}"]


def check_data_dir(data_dir: str | None) -> None:
  """Raises InputError unless `data_dir` holds the full CIFAR-10's batch files."""
  if not data_dir:
    raise InputError("--data_dir is required: the full CIFAR-10 (python -m linfjax.fetch DIR)")
  if not os.path.isdir(data_dir):
    raise InputError(f"--data_dir={data_dir}: no such directory; download the full CIFAR-10 "
                     f"with `python -m linfjax.fetch {data_dir}`")
  batch_dir = os.path.join(data_dir, "cifar-10-batches-py")
  batch_dir = batch_dir if os.path.isdir(batch_dir) else data_dir
  missing = [name for name in BATCH_FILES if not os.path.isfile(os.path.join(batch_dir, name))]
  if missing:
    raise InputError(f"--data_dir={data_dir}: no cifar-10-batches-py files {', '.join(missing)} "
                     f"in {batch_dir}; `python -m linfjax.fetch {data_dir}` writes them")
  small = [name for name in BATCH_FILES[1:]
           if os.path.getsize(os.path.join(batch_dir, name)) < FULL_BATCH_BYTES]
  if small:
    raise InputError(f"--data_dir={data_dir}: {', '.join(small)} hold fewer than 10,000 images: "
                     "not the full CIFAR-10 (the quick subset?); the row is at full size")


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise InputError(f"{path}: not found; the run has not finished a stage (run it with "
                     "--run, or name a run directory)") from None
  except (OSError, ValueError) as e:
    raise InputError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _field(config: dict, path: str):
  node = config
  for part in path.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def setting_differences(config: dict) -> list[str]:
  """How a run's config.json differs from the setting of BackdoorBench's row."""
  return [f"{path}={_field(config, path)!r} (row: {value!r})" for path, value in SETTING.items()
          if _field(config, path) != value]


def _numbers(entry) -> tuple[float, float] | str:
  if not isinstance(entry, dict) or not all(isinstance(entry.get(k), (int, float))
                                            for k in ("CA", "ASR")):
    return "no CA/ASR in results.json"
  return float(entry["CA"]), float(entry["ASR"])


def linfjax_numbers(results: dict, name: str | None, known) -> tuple[float, float] | str:
  """linfjax's (CA, ASR) for one row, or why there are none."""
  if name is None:
    return "not in linfjax"
  if name == "":
    return _numbers(results.get("train", {}).get("backdoored"))
  if name not in known:
    return f"not in linfjax (no `{name}` in linfjax.defenses.DEFENSES)"
  synthetic = results.get("prune", {}).get("synthetic")
  if synthetic is None:
    return "not run: results.json has no prune.synthetic (the prune stage did not finish)"
  if "skipped" in synthetic:
    return f"not run: the synthetic source was skipped ({synthetic['skipped']})"
  if name not in synthetic:
    return f"not run: `{name}` is not in this run's prune.defenses"
  entry = synthetic[name]
  return _numbers({"CA": entry.get("CA"), "ASR": entry.get("ASR_real")})


def _note(results: dict, name: str | None, why: str) -> str:
  if name == "nc_unlearning" and "reverse" in results and results["reverse"].get("flagged") is None:
    return "Neural Cleanse flagged no class"
  return why


def table(results: dict, known) -> list[str]:
  """The comparison as Markdown lines (header, rule, one line per row of BackdoorBench's)."""
  lines = ["| defense | linfjax | BackdoorBench C-Acc | BackdoorBench ASR | linfjax CA | "
           "linfjax ASR | CA diff | ASR diff | note |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for label, name, ca_ref, asr_ref, why in ROW:
    ours = linfjax_numbers(results, name, known)
    shown = "-" if name is None else (f"`{name}`" if name else "`train.backdoored`")
    if isinstance(ours, str):
      cells = ["-", "-", "-", "-", "; ".join(filter(None, (ours, why)))]
    else:
      ca, asr = ours
      cells = [f"{ca:.2f}", f"{asr:.2f}", f"{ca - ca_ref:+.2f}", f"{asr - asr_ref:+.2f}",
               _note(results, name, why)]
    lines.append("| " + " | ".join([label, shown, f"{ca_ref:.2f}", f"{asr_ref:.2f}", *cells])
                 + " |")
  return lines


def compare(run_dir: str, known) -> str:
  """The report of a run directory: its setting and the table."""
  results = _read_json(os.path.join(run_dir, "results.json"))
  if not isinstance(results, dict):
    raise InputError(f"{run_dir}/results.json: not a results object")
  lines = [f"BackdoorBench's BadNets row (CIFAR-10, PreActResNet-18, 10 % poisoning) against "
           f"{run_dir}; differences are linfjax minus BackdoorBench, in points."]
  config_path = os.path.join(run_dir, "config.json")
  if os.path.exists(config_path):
    differences = setting_differences(_read_json(config_path))
    if differences:
      lines.append("This run differs from the row's setting: " + "; ".join(differences) + ".")
  return "\n".join(lines + [""] + table(results, known))


def parse_args(argv) -> argparse.Namespace:
  """The command line; argparse rather than absl flags, so that importing this module (as
  its test does) defines no global flag."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--compare", help="a finished run's directory: print the table")
  parser.add_argument("--run", action="store_true",
                      help="run the row into --workdir, then print the table")
  parser.add_argument("--data_dir", help="the full CIFAR-10 (python -m linfjax.fetch)")
  parser.add_argument("--workdir", help="the run directory (created; reruns resume)")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  try:
    if args.run == bool(args.compare):
      raise InputError("give exactly one of --compare=RUN_DIR and --run --data_dir=DIR "
                       "--workdir=RUN_DIR")
    if args.compare:
      print(compare(args.compare, registry()))
      return
    check_data_dir(args.data_dir)
    if not args.workdir:
      raise InputError("--workdir is required: the run directory (created; reruns resume)")
  except InputError as e:
    print(f"backdoorbench_row: {e}", file=sys.stderr)
    sys.exit(2)
  workdir = os.path.abspath(args.workdir)  # The run's cwd is the repo root.
  argv = run_argv(os.path.abspath(args.data_dir), workdir, registry())
  print("$ " + shlex.join(["python", *argv[1:]]), flush=True)
  completed = subprocess.run(argv, cwd=REPO)
  if completed.returncode:
    sys.exit(completed.returncode)
  try:
    report = compare(workdir, registry())
  except InputError as e:
    sys.exit(f"backdoorbench_row: {e}")
  print(report)
  with open(os.path.join(workdir, "backdoorbench_row.md"), "w") as f:
    f.write(report + "\n")


if __name__ == "__main__":
  main()
