"""The one exception type for user mistakes: the CLI prints its message on one line, exit 2."""


class UserError(Exception):
    """Bad input from the user (unknown variant, bad path, layer out of range, ...)."""


class RunFailed(Exception):
    """A run that failed after it started, past what it may retry (a producer or worker that kept
    crashing, a loss that went non-finite): the CLI prints its message on one line, exit 1."""
