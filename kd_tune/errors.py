"""The one base class of every refusal a user can act on: the command line prints its message as one line."""


class KdTuneError(Exception):
    """A user-facing failure whose message says what went wrong and what is allowed; no traceback is shown."""

    exit_code = 1
