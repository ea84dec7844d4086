"""The CLI's own error type."""


class CliError(Exception):
    """A user error: printed as one line, without a traceback."""
