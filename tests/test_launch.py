"""launch/: the command lines each launcher prints and runs, and its flag checks.

No gcloud, SLURM or linfjax.main runs here: the dry runs are read, the local launcher's
parallel start runs tiny Python commands, and submitit is replaced by a recording fake.
"""

import functools
import os
import pickle
import re
import subprocess
import sys

from absl import app
import pytest

from conftest import REPO_ROOT

sys.path.insert(0, REPO_ROOT)  # launch/ is a folder of scripts beside the package.
from launch import common, local, slurm, tpu_vm

PY = sys.executable
CONFIG = "configs/cifar_patch.py:quick"


def cli(script, *args):
  """Runs `python launch/SCRIPT ARGS` in the repo root; returns (exit code, stdout, stderr)."""
  done = subprocess.run([PY, os.path.join("launch", script), *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, check=False, timeout=60)
  return done.returncode, done.stdout, done.stderr


def test_main_command_and_shell_line():
  command = common.main_command("py", CONFIG, "runs/my grid", shard=(1, 4), quiet=True,
                                extra=["--config.seed=2"])
  assert command == ["py", "-m", "linfjax.main", f"--config={CONFIG}", "--workdir=runs/my grid",
                     "--shard=1/4", "--quiet", "--config.seed=2"]
  assert common.main_command("py", "c.py", "w", distributed=True) == [
      "py", "-m", "linfjax.main", "--config=c.py", "--workdir=w", "--distributed"]
  assert common.shell_line(command, {"CUDA_VISIBLE_DEVICES": "0,1", "A": "x y"}) == (
      f"CUDA_VISIBLE_DEVICES=0,1 A='x y' py -m linfjax.main --config={CONFIG} "
      "'--workdir=runs/my grid' --shard=1/4 --quiet --config.seed=2")
  assert common.report_command("py", "w") == ["py", "-m", "linfjax.reports.grid_report", "w"]


def test_local_jobs():
  main = ["py", "-m", "linfjax.main", "--config=c.py", "--workdir=w"]
  assert local.jobs("c.py", "w", 1, python="py") == [({}, main)]
  assert local.jobs("c.py", "w", 2, devices_per_process=2, python="py", extra=["--x=1"]) == [
      ({"CUDA_VISIBLE_DEVICES": "0,1"}, main + ["--shard=0/2", "--quiet", "--x=1"]),
      ({"CUDA_VISIBLE_DEVICES": "2,3"}, main + ["--shard=1/2", "--quiet", "--x=1"])]


def test_local_dry_run():
  code, out, _ = cli("local.py", f"--config={CONFIG}", "--workdir=runs/g", "--processes=2",
                     "--devices_per_process=1", "--dry_run")
  main = f"{PY} -m linfjax.main --config={CONFIG} --workdir=runs/g"
  assert code == 0
  assert out.splitlines() == [f"CUDA_VISIBLE_DEVICES=0 {main} --shard=0/2 --quiet &",
                              f"CUDA_VISIBLE_DEVICES=1 {main} --shard=1/2 --quiet &",
                              "wait",
                              f"{PY} -m linfjax.reports.grid_report runs/g"]
  code, out, _ = cli("local.py", f"--config={CONFIG}", "--workdir=runs/g", "--dry_run")
  assert (code, out) == (0, main + "\n")


def test_local_runs_jobs_in_parallel_with_their_environment(tmp_path):
  # Each job creates its file, then waits for the other's: both exit 0 only if they overlap.
  # The exit code is then CUDA_VISIBLE_DEVICES, to show each job got its own variables.
  wait_for_other = (
      "import os, sys, time\n"
      "mine, other = sys.argv[1:]\n"
      "open(mine, 'w').close()\n"
      "deadline = time.time() + 20\n"
      "while not os.path.exists(other) and time.time() < deadline:\n"
      "  time.sleep(0.01)\n"
      "sys.exit(int(os.environ['CUDA_VISIBLE_DEVICES']) if os.path.exists(other) else 99)\n")
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  codes = local.run_parallel([({"CUDA_VISIBLE_DEVICES": "3"}, [PY, "-c", wait_for_other, a, b]),
                              ({"CUDA_VISIBLE_DEVICES": "0"}, [PY, "-c", wait_for_other, b, a])])
  assert codes == [3, 0]


@pytest.mark.parametrize("args, message", [
    (["--processes=0"], "--processes=0"),
    (["--devices_per_process=0"], "--devices_per_process=0"),
    (["--config=configs/missing.py"], "no file configs/missing.py"),
    (["--config="], "no file"),
])
def test_local_flag_errors(args, message):
  code, out, err = cli("local.py", f"--config={CONFIG}", "--workdir=w", "--dry_run", *args)
  assert code == 1 and message in err and out == ""


def test_required_flags():
  code, _, err = cli("local.py", "--workdir=w", "--dry_run")
  assert code == 1 and "--config must have a value" in err
  code, _, err = cli("slurm.py", f"--config={CONFIG}", "--workdir=w", "--dry_run")
  assert code == 1 and "--array must have a value" in err


def test_slurm_executor_parameters():
  assert slurm.executor_parameters(partition="gpu", gpus_per_task=2, cpus_per_task=4, mem_gb=16,
                                   time_min=60, max_parallel=3) == {
      "name": "linfjax", "timeout_min": 60, "mem_gb": 16, "cpus_per_task": 4,
      "tasks_per_node": 1, "gpus_per_node": 2, "slurm_partition": "gpu",
      "slurm_array_parallelism": 3}
  assert slurm.executor_parameters(partition=None, gpus_per_task=0, cpus_per_task=1, mem_gb=1,
                                   time_min=5, max_parallel=None) == {
      "name": "linfjax", "timeout_min": 5, "mem_gb": 1, "cpus_per_task": 1, "tasks_per_node": 1}


def test_slurm_dry_run():
  code, out, _ = cli("slurm.py", f"--config={CONFIG}", "--workdir=runs/g", "--array=4",
                     "--partition=gpu", "--time_min=30", "--dry_run", "--", "--config.seed=1")
  assert code == 0
  main = f"{PY} -m linfjax.main --config={CONFIG} --workdir=runs/g"
  assert out.splitlines() == [
      "executor = submitit.AutoExecutor(folder='runs/g/slurm', cluster='slurm')",
      "executor.update_parameters(name='linfjax', timeout_min=30, mem_gb=32, cpus_per_task=8, "
      "tasks_per_node=1, gpus_per_node=1, slurm_partition='gpu')",
      "jobs = executor.map_array(functools.partial(subprocess.run, check=True, "
      f"cwd={REPO_ROOT!r}), commands)",
      *[f"commands[{i}]: {main} --shard={i}/4 --quiet --config.seed=1" for i in range(4)]]
  code, _, err = cli("slurm.py", f"--config={CONFIG}", "--workdir=w", "--array=0", "--dry_run")
  assert code == 1 and "--array=0" in err


def test_slurm_submit_without_submitit(monkeypatch):
  monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` fail
  with pytest.raises(app.UsageError, match=r"pip install -e '\.\[launch\]'"):
    slurm.submit("logs", {}, "/", [["true"]])


def test_slurm_submit_calls_submitit(monkeypatch, tmp_path):
  calls = {}

  class Job:

    def __init__(self, job_id):
      self.job_id = job_id

  class AutoExecutor:

    def __init__(self, folder, cluster):
      calls["executor"] = (folder, cluster)

    def update_parameters(self, **parameters):
      calls["parameters"] = parameters

    def map_array(self, fn, commands):
      calls["fn"], calls["commands"] = fn, commands
      return [Job(f"77_{i}") for i in range(len(commands))]

  monkeypatch.setitem(sys.modules, "submitit", type(sys)("submitit"))
  monkeypatch.setattr(sys.modules["submitit"], "AutoExecutor", AutoExecutor, raising=False)
  commands = slurm.task_commands("c.py", "w", 2, python="py")
  ids = slurm.submit("logs", {"timeout_min": 5}, str(tmp_path), commands)
  assert ids == ["77_0", "77_1"]
  assert calls["executor"] == ("logs", "slurm") and calls["parameters"] == {"timeout_min": 5}
  assert calls["commands"] == [
      ["py", "-m", "linfjax.main", "--config=c.py", "--workdir=w", f"--shard={i}/2", "--quiet"]
      for i in range(2)]
  # What a node runs: the stdlib function, picklable by reference, in the submit directory.
  fn = pickle.loads(pickle.dumps(calls["fn"]))
  assert isinstance(fn, functools.partial) and fn.func is subprocess.run
  assert fn.keywords == {"check": True, "cwd": str(tmp_path)}
  fn([PY, "-c", "open('ran', 'w').close()"])
  assert (tmp_path / "ran").exists()
  with pytest.raises(subprocess.CalledProcessError):
    fn([PY, "-c", "raise SystemExit(3)"])


@pytest.mark.parametrize("accelerator_type, workers", [
    ("v2-8", 1), ("v2-32", 4), ("v3-8", 1), ("v4-8", 1), ("v4-32", 4), ("v5p-16", 2),
    ("v5p-128", 16), ("v4-12", None), ("v5litepod-16", None), ("v6e-8", None), ("v4", None)])
def test_tpu_workers_of(accelerator_type, workers):
  assert tpu_vm.workers_of(accelerator_type) == workers


def tpu_commands(**overrides):
  kwargs = dict(config=CONFIG, workdir="runs/g", accelerator_type="v4-32",
                version="tpu-ubuntu2204-base", repo=REPO_ROOT, workers=None,
                steps=[s for s in tpu_vm.STEPS if s != "delete"])
  kwargs.update(overrides)
  return tpu_vm.commands(tpu_vm.Tpu("t", "us-central2-b", "proj"), kwargs.pop("steps"),
                         **kwargs)


def test_tpu_commands():
  vm = ["gcloud", "compute", "tpus", "tpu-vm"]
  where = ["--zone=us-central2-b", "--project=proj"]
  sources = [os.path.join(REPO_ROOT, f)
             for f in ("pyproject.toml", "setup.cfg", "README.md", "linfjax", "configs")]
  assert tpu_commands(extra=["--config.seed=1"]) == [
      ("create", vm + ["create", "t", "--accelerator-type=v4-32",
                       "--version=tpu-ubuntu2204-base"] + where),
      ("copy", vm + ["ssh", "t", "--worker=all", "--command=mkdir -p ~/linfjax"] + where),
      ("copy", vm + ["scp", "--recurse", *sources, "t:~/linfjax/", "--worker=all"] + where),
      ("install", vm + ["ssh", "t", "--worker=all", "--command=cd ~/linfjax && python3 -m pip "
                        "install -U \"jax[tpu]\" -e ."] + where),
      ("run", vm + ["ssh", "t", "--worker=all", "--command=cd ~/linfjax && python3 -m "
                    f"linfjax.main --config={CONFIG} --workdir=runs/g --distributed --quiet "
                    "--config.seed=1"] + where),
      ("collect", ["mkdir", "-p", "runs"]),
      *[("collect", vm + ["scp", "--recurse", "t:~/linfjax/runs/g", "runs",
                          f"--worker={w}"] + where) for w in range(4)],
      ("report", [PY, "-m", "linfjax.reports.grid_report", "runs/g"])]


def test_tpu_steps_and_workers():
  planned = tpu_commands(steps=["delete", "collect"], accelerator_type="v6e-16", workers=2,
                         config=None)
  assert [step for step, _ in planned] == ["collect"] * 3 + ["delete"]
  assert planned[-1][1] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t",
                            "--zone=us-central2-b", "--project=proj"]
  assert tpu_commands(steps=["collect"], workdir="/data/g/", workers=1) == [
      ("collect", ["mkdir", "-p", "/data"]),
      ("collect", ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "t:/data/g", "/data",
                   "--worker=0", "--zone=us-central2-b", "--project=proj"])]
  run = tpu_commands(steps=["run"], remote_python="~/venv/bin/python")[0][1]
  assert run[7].startswith("--command=cd ~/linfjax && ~/venv/bin/python -m linfjax.main ")


@pytest.mark.parametrize("overrides, message", [
    ({"steps": ["run", "deploy"]}, "unknown deploy; known steps: create, copy, install, run, "
                                   "collect, report, delete"),
    ({"steps": []}, "known steps"),
    ({"accelerator_type": "v6e-16"}, "give --workers"),
    ({"version": None}, "--version is needed by step create"),
    ({"workdir": ""}, "--workdir is needed by step run"),
    ({"workdir": "."}, "--workdir=.: name a directory"),
    ({"config": "launch/local.py"}, "give a path inside the copied"),
    ({"config": "configs/missing.py"}, "no file configs/missing.py"),
    ({"repo": "/", "steps": ["copy"]}, "--repo=/ is not a linfjax checkout: no pyproject.toml"),
])
def test_tpu_flag_errors(overrides, message):
  with pytest.raises(app.UsageError, match=re.escape(message)):
    tpu_commands(**overrides)


def test_tpu_dry_run():
  code, out, _ = cli("tpu_vm.py", "--name=t", "--zone=z", "--accelerator_type=v4-16",
                     "--version=v", f"--config={CONFIG}", "--workdir=runs/g", "--dry_run")
  assert code == 0
  lines = out.splitlines()
  assert [line for line in lines if line.startswith("#")] == [
      "# create", "# copy", "# install", "# run", "# collect", "# report"]
  run = lines[lines.index("# run") + 1]
  assert run == ("gcloud compute tpus tpu-vm ssh t --worker=all '--command=cd ~/linfjax && "
                 f"python3 -m linfjax.main --config={CONFIG} --workdir=runs/g --distributed "
                 "--quiet' --zone=z")
  assert lines[lines.index("# collect") + 1:lines.index("# report")] == [
      "mkdir -p runs",
      "gcloud compute tpus tpu-vm scp --recurse 't:~/linfjax/runs/g' runs --worker=0 --zone=z",
      "gcloud compute tpus tpu-vm scp --recurse 't:~/linfjax/runs/g' runs --worker=1 --zone=z"]
  code, out, err = cli("tpu_vm.py", "--name=t", "--zone=z", "--steps=run,deploy", "--dry_run")
  assert code == 1 and out == "" and "known steps: create, copy" in err
