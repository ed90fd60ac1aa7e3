"""Command line: `python -m linfjax.main --config=configs/cifar_patch.py:quick --workdir=DIR`.

Runs the config's stages (see `linfjax.pipeline`) into DIR; rerunning the same
command resumes where a killed run stopped and skips finished stages.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from linfjax import pipeline

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar_patch.py:quick.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (created; reruns resume in it).")
flags.DEFINE_bool("quiet", False, "No progress bars.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  # Orbax logs every save step by step at INFO; keep linfjax's own progress readable.
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
  progress = not FLAGS.quiet and sys.stderr.isatty()
  results = pipeline.run(FLAGS.config, FLAGS.workdir, progress=progress)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  app.run(main)
