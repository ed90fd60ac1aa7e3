"""Command line: `python -m linfjax.main --config=configs/cifar_patch.py:quick --workdir=DIR`.

Runs the config's stages (see `linfjax.pipeline`) into DIR; rerunning the same
command resumes where a killed run stopped and skips finished stages. A config with
`sweep.axes` runs a grid of runs into DIR/runs/<name>/ (see `linfjax.sweep`), e.g.
`--config=configs/grid_quick.py`; `--shard=I/N` or `--distributed` share it among
processes or hosts (launch/ submits such jobs).
"""

import json
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from linfjax import compile_cache, grid, pipeline, sweep

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar_patch.py:quick.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (created; reruns resume in it).")
flags.DEFINE_bool("quiet", False, "No progress bars.")
flags.DEFINE_string("shard", "", "Grids only: INDEX/COUNT, run only runs INDEX, INDEX+COUNT, ...")
flags.DEFINE_bool("distributed", False, "Grids on several hosts: jax.distributed.initialize(), "
                  "then each process runs its own shard (process_index/process_count).")
flags.DEFINE_string("compile_cache", "", "Directory of JAX's persistent compilation cache, or "
                    "'off'; default $LINFJAX_COMPILE_CACHE, else ~/.cache/linfjax/jax/<cpu> "
                    "(linfjax/compile_cache.py).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  # Orbax logs every save step by step at INFO; keep linfjax's own progress readable.
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
  progress = not FLAGS.quiet and sys.stderr.isatty()
  logging.info("compilation cache: %s", compile_cache.enable(FLAGS.compile_cache) or "off")
  if not grid.is_grid(FLAGS.config):
    if FLAGS.shard or FLAGS.distributed:
      raise app.UsageError("--shard and --distributed need a grid (config.sweep.axes)")
    print(json.dumps(pipeline.run(FLAGS.config, FLAGS.workdir, progress=progress), indent=1))
    return
  shard = grid.parse_shard(FLAGS.shard) if FLAGS.shard else (0, 1)
  if FLAGS.distributed:
    if FLAGS.shard:
      raise app.UsageError("--distributed takes its shard from the process index; drop --shard")
    jax.distributed.initialize()
    shard = (jax.process_index(), jax.process_count())
  statuses = sweep.run(FLAGS.config, FLAGS.workdir, shard=shard, progress=progress)
  print(json.dumps(statuses, indent=1))
  failed = sweep.failure_message(statuses, FLAGS.workdir)
  if failed:
    sys.exit(failed)  # Exit code 1, so SLURM and the launchers see the failure.


if __name__ == "__main__":
  app.run(main)
