"""The one exception type for user mistakes: the CLI prints its message on one line, exit 2."""


class UserError(Exception):
    """Bad input from the user (unknown variant, bad path, layer out of range, ...)."""
