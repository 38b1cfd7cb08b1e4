"""The base of every error a user can act on; the CLI prints these as one line (exit code 2)."""

# Where a vaeft command leaves its exit status for an orchestrator (dvc repro folds every failing
# command into exit 1). Lives here, at the bottom, because the CLI writes it and the torchrun
# launcher below the CLI must keep it away from its ranks.
STATUS_FILE_ENV = "VAEFT_STATUS_FILE"
USER_ERROR_EXIT = 2


class VaeftError(Exception):
    """An expected failure with a message that says what is wrong and what to do."""
