"""The base of every error a user can act on; the CLI prints these as one line (exit code 2)."""


class VaeftError(Exception):
    """An expected failure with a message that says what is wrong and what to do."""
