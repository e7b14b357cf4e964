"""One exception type for every user-facing failure, so the CLI can print one line and exit 2."""


class BlockdraftError(Exception):
    """A problem the user can fix (bad input, missing model, mismatched heads...)."""
