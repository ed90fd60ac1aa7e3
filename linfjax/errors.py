"""One shape for every error a user can fix: a bad config, dataset, trigger, workdir or checkpoint.

Every such error derives from `UserError`. Its message is one sentence that says what is
wrong, where (the config field, file or directory) and how to fix it, for example

    config.model.name: unknown value 'resnet'; known: cnn, preact_resnet18, vgg11

`linfjax.main` prints it as one line and exits with `EXIT_USER_ERROR`, with the traceback
only at `--verbosity=1` or higher; any other exception is a bug and keeps its traceback.
Library code raises the subclass of the module that detects the problem
(`config.ConfigError`, `data.DatasetError`, `attacks.TriggerError`,
`pipeline.WorkdirError`, `checkpoints.CheckpointError`, `train.TrainingDiverged`,
`reverse.ReverseDiverged`), so callers can catch one kind or all of them.
"""

from __future__ import annotations

import errno
import os

EXIT_USER_ERROR = 2

# Operating-system errors that a person fixes outside linfjax (space, permissions, a file
# where a directory should be), and the advice for each.
_OS_ADVICE = {
    errno.ENOSPC: "free some disk space (or use a --workdir on another disk) and rerun; "
                  "finished stages and checkpoints are kept",
    errno.EDQUOT: "free some of your disk quota (or use a --workdir elsewhere) and rerun; "
                  "finished stages and checkpoints are kept",
    errno.EROFS: "the file system is read-only; use a writable --workdir",
    errno.EACCES: "make it writable (and readable) for you, or use another --workdir",
    errno.EPERM: "make it writable for you, or use another --workdir",
    errno.ENOTDIR: "a file stands where a directory is expected; move it away or use another "
                   "--workdir",
    errno.EEXIST: "a file stands where a directory is expected; move it away or use another "
                  "--workdir",
    errno.EISDIR: "a directory stands where a file is expected; move it away or use another "
                  "--workdir",
}


class UserError(Exception):
  """An error the user can fix; its message says what is wrong, where, and the fix."""


def one_line(error: BaseException) -> str:
  """The error's message on one line (newlines and runs of spaces collapsed)."""
  text = " ".join(str(error).split())
  return text or type(error).__name__


def from_os_error(error: OSError) -> UserError | None:
  """A UserError for a disk-full, permission or file-in-the-way OSError; None for others."""
  advice = _OS_ADVICE.get(error.errno)
  if advice is None:
    return None
  where = error.filename if error.filename is not None else "a file of the run"
  reason = error.strerror or os.strerror(error.errno)
  return UserError(f"{where}: {reason}; {advice}")
