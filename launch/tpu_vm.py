"""Runs linfjax on a Cloud TPU VM, one host or a pod slice, through gcloud from this machine.

  python launch/tpu_vm.py --name=linfjax-v4 --zone=us-central2-b --accelerator_type=v4-32 \
      --version=tpu-ubuntu2204-base --config=configs/grid_quick.py --workdir=runs/grid --dry_run

--steps picks from these, which run in this order (default: all but delete):
  create   gcloud compute tpus tpu-vm create NAME --zone --accelerator-type --version
  copy     mkdir ~/linfjax on every worker, then one scp to all workers of what installs and
           runs linfjax (`REPO_FILES` of --repo); a rerun overwrites those and leaves the
           work directories alone
  install  `pip install -U "jax[tpu]" -e .` in ~/linfjax on every worker (JAX's TPU command)
  run      linfjax.main --distributed --quiet on all workers at once (`--worker=all`):
           each process runs the grid's runs of shard process_index/process_count into
           ~/linfjax/WORKDIR on its own worker (checkpoints process-local, shared pieces in
           each worker's own WORKDIR/shared/); a worker whose runs failed exits 1, which
           fails this step
  collect  one scp per worker of its ~/linfjax/WORKDIR into the parent of the local
           WORKDIR: the workers' runs/<name>/ (each has its own), grid.json and shared/
           (the same content under the same names on all) merge into the local WORKDIR
  report   python -m linfjax.reports.grid_report WORKDIR, here
  delete   gcloud compute tpus tpu-vm delete NAME (gcloud asks to confirm)

Each command is printed, then run with subprocess.run(check=True), so the first failure
stops; --dry_run only prints. A relative --workdir is under ~/linfjax on the workers and
under the current directory here. Arguments after `--` go to linfjax.main, e.g.
`-- --config.data.path=/data/cifar-10-batches-py`: the data must be on every worker.
Before ssh reaches several workers, gcloud asks for `ssh-add ~/.ssh/google_compute_engine`.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import shlex
import subprocess
import sys
from typing import Sequence

from absl import app, flags

if __package__ in (None, ""):  # Run as `python launch/tpu_vm.py`: make `launch` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import common

STEPS = ("create", "copy", "install", "run", "collect", "report", "delete")
# What `pip install -e .` and linfjax.main need on a worker (setup.cfg reads README.md).
REPO_FILES = ("pyproject.toml", "setup.cfg", "README.md", "linfjax", "configs")
REMOTE_DIR = "~/linfjax"
# TensorCores per TPU VM, where the number in the accelerator type counts TensorCores
# (cloud.google.com/tpu/docs/v2, v4, v5p: 4 chips of 2 TensorCores per VM). In v5e
# (v5litepod) and v6e it counts chips, and a VM holds 1, 4 or 8 of them: give --workers.
CORES_PER_WORKER = {"v2": 8, "v3": 8, "v4": 8, "v5p": 8}

_NAME = flags.DEFINE_string("name", None, "TPU name.")
_ZONE = flags.DEFINE_string("zone", None, "TPU zone, e.g. us-central2-b.")
_ACCELERATOR_TYPE = flags.DEFINE_string("accelerator_type", None, "e.g. v4-32; needed by "
                                        "create, and by collect unless --workers is given.")
_VERSION = flags.DEFINE_string("version", None, "TPU software (runtime) version for create, "
                               "e.g. tpu-ubuntu2204-base.")
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project; unset, gcloud's.")
_REPO = flags.DEFINE_string("repo", common.REPO_ROOT, "Local linfjax checkout to copy.")
_WORKERS = flags.DEFINE_integer("workers", None, "TPU VM workers (hosts) of the slice; "
                                "unset, derived from --accelerator_type where it can be.",
                                lower_bound=1)
_REMOTE_PYTHON = flags.DEFINE_string(
    "remote_python", "python3", "Python on the workers, put into their shell commands as "
    "is (so ~/venv/bin/python works); it must be one that linfjax's JAX supports.")
_STEPS = flags.DEFINE_list("steps", [s for s in STEPS if s != "delete"],
                           f"Steps to do, of {','.join(STEPS)}.")
flags.mark_flags_as_required(["name", "zone"])


@dataclasses.dataclass(frozen=True)
class Tpu:
  """The TPU that every gcloud command names."""
  name: str
  zone: str
  project: str | None = None

  def gcloud(self, verb: str, *args: str) -> list[str]:
    """`gcloud compute tpus tpu-vm VERB ARGS --zone=ZONE [--project=PROJECT]`."""
    project = [f"--project={self.project}"] if self.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={self.zone}", *project]

  def on_all_workers(self, shell_command: str) -> list[str]:
    return self.gcloud("ssh", self.name, "--worker=all", f"--command={shell_command}")


def workers_of(accelerator_type: str) -> int | None:
  """TPU VMs of a slice, e.g. 4 for v4-32; None where the type does not tell."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type)
  if not match or match.group(1) not in CORES_PER_WORKER:
    return None
  cores, per_worker = int(match.group(2)), CORES_PER_WORKER[match.group(1)]
  return cores // per_worker if cores % per_worker == 0 else None


def check_steps(steps: Sequence[str]) -> list[str]:
  """The steps in the order they run; raises app.UsageError on an unknown or missing one."""
  unknown = [s for s in steps if s not in STEPS]
  if unknown or not steps:
    raise app.UsageError(f"--steps={','.join(steps)}: unknown {', '.join(unknown) or 'empty'};"
                         f" known steps: {', '.join(STEPS)}")
  return [s for s in STEPS if s in steps]


def check_config(config: str, repo: str) -> None:
  """The config must be a file that the copy step brings to the workers."""
  path = os.path.normpath(common.check_config(config, repo))
  if os.path.isabs(path) or path.split(os.sep, 1)[0] not in REPO_FILES:
    raise app.UsageError(f"--config={config}: give a path inside the copied "
                         f"{', '.join(REPO_FILES)} of --repo, relative to it")


def check_flags(steps: Sequence[str], *, config: str | None, workdir: str | None,
                accelerator_type: str | None, version: str | None, repo: str,
                workers: int | None) -> tuple[list[str], int | None]:
  """The steps in order, and the number of workers where collect needs it.

  Raises:
    app.UsageError: a flag that one of the steps needs is missing or wrong.
  """
  steps = check_steps(steps)
  needed_by = {"config": ("run",), "workdir": ("run", "collect", "report"),
               "accelerator_type": ("create",), "version": ("create",)}
  given = {"config": config, "workdir": workdir, "accelerator_type": accelerator_type,
           "version": version}
  for flag, users in needed_by.items():
    needing = [s for s in users if s in steps]
    if not given[flag] and needing:
      raise app.UsageError(f"--{flag} is needed by step {needing[0]}")
  if workdir and os.path.basename(os.path.normpath(workdir)) in (".", ".."):
    raise app.UsageError(f"--workdir={workdir}: name a directory (collect copies it by name)")
  if "run" in steps:
    check_config(config, repo)
  if "copy" in steps:
    missing = [f for f in REPO_FILES if not os.path.exists(os.path.join(repo, f))]
    if missing:
      raise app.UsageError(f"--repo={repo} is not a linfjax checkout: no {', '.join(missing)}")
  if "collect" in steps and workers is None:
    workers = workers_of(accelerator_type or "")
    if workers is None:
      known = ", ".join(f"{v}-N (N/{c} VMs)" for v, c in CORES_PER_WORKER.items())
      raise app.UsageError(f"--accelerator_type={accelerator_type}: the number of TPU VMs is "
                           f"derived only for {known}; give --workers")
  return steps, workers


def commands(tpu: Tpu, steps: Sequence[str], *, config: str | None, workdir: str | None,
             accelerator_type: str | None, version: str | None, repo: str,
             workers: int | None, remote_python: str = "python3",
             extra: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
  """(step, argv) of every command of `steps`, in the order they run.

  Raises:
    app.UsageError: from `check_flags`, before any command is built.
  """
  steps, workers = check_flags(steps, config=config, workdir=workdir,
                               accelerator_type=accelerator_type, version=version, repo=repo,
                               workers=workers)
  cd = f"cd {REMOTE_DIR} && "
  result = []
  for step in steps:
    if step == "create":
      result.append((step, tpu.gcloud("create", tpu.name, f"--accelerator-type={accelerator_type}",
                                      f"--version={version}")))
    elif step == "copy":
      result.append((step, tpu.on_all_workers(f"mkdir -p {REMOTE_DIR}")))
      sources = [os.path.join(repo, f) for f in REPO_FILES]
      result.append((step, tpu.gcloud("scp", "--recurse", *sources, f"{tpu.name}:{REMOTE_DIR}/",
                                      "--worker=all")))
    elif step == "install":
      result.append((step, tpu.on_all_workers(
          f'{cd}{remote_python} -m pip install -U "jax[tpu]" -e .')))
    elif step == "run":
      main_args = common.main_command(remote_python, config, workdir, distributed=True,
                                      quiet=True, extra=extra)[1:]
      result.append((step, tpu.on_all_workers(f"{cd}{remote_python} {shlex.join(main_args)}")))
    elif step == "collect":
      # Into the parent, so that each worker's WORKDIR merges into the local one.
      parent = os.path.dirname(os.path.normpath(workdir)) or "."
      remote = posixpath.join(REMOTE_DIR, os.path.normpath(workdir))
      result.append((step, ["mkdir", "-p", parent]))
      result += [(step, tpu.gcloud("scp", "--recurse", f"{tpu.name}:{remote}", parent,
                                   f"--worker={w}")) for w in range(workers)]
    elif step == "report":
      result.append((step, common.report_command(common.PYTHON, workdir)))
    elif step == "delete":
      result.append((step, tpu.gcloud("delete", tpu.name)))
  return result


def main(argv: Sequence[str]) -> int:
  tpu = Tpu(_NAME.value, _ZONE.value, _PROJECT.value)
  planned = commands(tpu, _STEPS.value, config=common.CONFIG.value,
                     workdir=common.WORKDIR.value, accelerator_type=_ACCELERATOR_TYPE.value,
                     version=_VERSION.value, repo=_REPO.value, workers=_WORKERS.value,
                     remote_python=_REMOTE_PYTHON.value, extra=argv[1:])
  for i, (step, command) in enumerate(planned):
    if i == 0 or planned[i - 1][0] != step:
      print(f"# {step}", flush=True)
    print(common.shell_line(command), flush=True)
    if not common.DRY_RUN.value:
      try:
        subprocess.run(command, check=True)
      except subprocess.CalledProcessError as error:
        print(f"step {step} failed with exit code {error.returncode}; stopped there",
              file=sys.stderr)
        return error.returncode
  return 0


if __name__ == "__main__":
  app.run(main)
