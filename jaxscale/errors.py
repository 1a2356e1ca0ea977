"""The errors a run reports as one line, and the exit status each one ends `jaxscale-train` with.

Every module raises these (or a subclass) with a message that names the config key, file, step
or checkpoint at fault; `jaxscale-train` prints `jaxscale-train: error: <message>` and exits with
the status below. A traceback is printed only with `--debug` or JAXSCALE_DEBUG=1.
"""
from __future__ import annotations

EXIT_NONFINITE = 1  # too many non-finite steps in a row; the last checkpoint is the last good one
EXIT_USAGE = 2  # bad config, model, dataset, workdir or checkpoint; nothing was written
EXIT_UNREACHABLE = 3  # the coordinator of a multi-process run could not be reached
EXIT_IO = 4  # reading or writing a file failed: full disk, read-only or damaged files
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: a checkpoint was saved after SIGTERM/SIGINT; rerun

EXIT_STATUSES = {
    0: "done",
    EXIT_NONFINITE: "too many non-finite steps in a row",
    EXIT_USAGE: "bad config, model, dataset, workdir or checkpoint (nothing written), or the "
                "workdir is in use by another run",
    EXIT_UNREACHABLE: "coordinator unreachable",
    EXIT_IO: "a file could not be read or written (full disk, read-only, damaged data)",
    EXIT_PREEMPTED: "preempted by SIGTERM/SIGINT after saving a checkpoint (rerun the same "
                    "command to resume)",
}


class JaxscaleError(Exception):
  """A failure reported as one line; `exit_status` is what `jaxscale-train` exits with."""
  exit_status = EXIT_USAGE


class ConfigError(JaxscaleError, ValueError):
  """A bad configuration value, model, dataset or task; the message names the key."""


class DataError(JaxscaleError, OSError):
  """A dataset that cannot be found or read; the message names the file and the config key."""
  exit_status = EXIT_IO


class WorkdirError(JaxscaleError, OSError):
  """A workdir that cannot be used: not a directory, not writable, full, or in use."""
  exit_status = EXIT_IO


class WorkdirInUse(WorkdirError):
  """Another live run holds the workdir's lock; the message names its host and pid."""
  exit_status = EXIT_USAGE


def first_line(error: BaseException, limit: int = 300) -> str:
  """`Type: first line of the message`, short enough to sit inside one error line."""
  lines = str(error).strip().splitlines() or [""]
  text = lines[0][:limit]
  return f"{type(error).__name__}: {text}" if text else type(error).__name__
