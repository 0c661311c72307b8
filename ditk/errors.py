"""Errors and exit codes that scripts and Slurm jobs can rely on."""

# Exit codes (stable; documented in README.md).
EXIT_OK = 0
EXIT_FAILURE = 1  # a fault of the run or the machine (non-finite loss, a bug, out of memory)
EXIT_USAGE = 2  # bad preset, key, value, path or file: one line on stderr, nothing written is lost
EXIT_PREEMPTED = 75  # SIGTERM/SIGUSR1 received: a checkpoint was saved, requeue the job (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): during training a checkpoint was saved first (128 + SIGINT)


class DitkError(Exception):
    """A problem with the user's input. The CLI prints `error: <message>` and exits with `exit_code` (2).

    The message is one line that names the problem and the fix.
    """

    exit_code = EXIT_USAGE


class ConfigError(DitkError):
    """An unknown key, a wrong type, a missing preset or a missing file in a config."""


class RunFailed(DitkError):
    """The run itself failed (e.g. the loss became NaN): one line, exit 1, nothing of the failed step is saved."""

    exit_code = EXIT_FAILURE


def refused_global(exc: BaseException) -> str | None:
    """The module.name of the global that torch.load(weights_only=True) refused to unpickle, if that is why it
    failed. torch words this differently across versions ('Unsupported global: GLOBAL x.y', 'Trying to load
    unsupported GLOBAL x.y whose module ...'); both name it after 'GLOBAL '."""
    import re

    found = re.search(r"GLOBAL ([A-Za-z_][\w.]*)", str(exc))
    return found.group(1) if found else None
