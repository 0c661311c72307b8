"""Errors and exit codes that scripts and Slurm jobs can rely on."""

# Exit codes (stable; documented in README.md).
EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected failure (a bug, an out-of-memory, ...): a traceback is printed
EXIT_USAGE = 2  # bad preset, key, value, path or file: one line on stderr, nothing written is lost
EXIT_PREEMPTED = 75  # SIGTERM/SIGUSR1 received: a checkpoint was saved, requeue the job (EX_TEMPFAIL)


class DitkError(Exception):
    """A problem with the user's input. The CLI prints `error: <message>` and exits with code 2.

    The message is one line that names the problem and the fix.
    """


class ConfigError(DitkError):
    """An unknown key, a wrong type, a missing preset or a missing file in a config."""
