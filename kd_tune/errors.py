"""The base class of every refusal a user can act on, and the one way a message shows a bad value."""

import reprlib

SHOWN_CHARS = 80  # a bad value is shown at most this long: the message stays one readable line


class KdTuneError(Exception):
    """A user-facing failure whose message says what went wrong and what is allowed; no traceback is shown."""

    exit_code = 1


class InputError(KdTuneError, ValueError):
    """The user's input (a config, a data set, an argument) is wrong; the command line exits with 2."""

    exit_code = 2


class DataError(InputError):
    """A data set or manifest the run cannot use; the message names the file (and line)."""


class MissingExtraError(KdTuneError, ImportError):
    """An optional extra (e.g. `pip install 'kd-tune[synth]'`) that a command needs is not installed."""

    exit_code = 2


def _bounded_repr() -> reprlib.Repr:
    # reprlib stops at these sizes, so showing a huge value (an expanded YAML alias bomb) costs no time or memory
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxstring, shown.maxother, shown.maxlong = 3, SHOWN_CHARS, SHOWN_CHARS, SHOWN_CHARS
    shown.maxlist = shown.maxtuple = shown.maxdict = shown.maxset = 6
    return shown


_REPR = _bounded_repr()


def shown(value: object) -> str:
    """repr(value) cut to SHOWN_CHARS characters, computed in bounded time however large the value."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."
MAX_PROBLEMS_SHOWN = 8  # of a config's problems, on its one line


class ConfigError(InputError):
    """Every problem found in one configuration, on one line: `SOURCE: problem | problem | ...`."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        lines = [" ".join(p.split()) for p in problems[:MAX_PROBLEMS_SHOWN]]  # one line, whatever a message held
        more = [f"and {len(problems) - MAX_PROBLEMS_SHOWN} more"] if len(problems) > MAX_PROBLEMS_SHOWN else []
        head = f"{source}: " if len(problems) == 1 else f"{source}: {len(problems)} problems: "
        super().__init__(head + " | ".join(lines + more))


def printable(text: str) -> str:
    """`text` with every character a terminal would act on or hide (ESC, BEL, CR, bidi overrides, bytes that were not
    UTF-8) written as its escape, e.g. `\\x1b`: a file name cannot move the cursor, recolour or retitle the terminal.
    Newlines are kept: a report's lines stay lines."""
    return "\n".join("".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                             for c in line) for line in text.split("\n"))


def s3_refusal(error: OSError) -> InputError | None:
    """pyarrow's failure to reach or use an S3 store (a bare OSError saying "AWS Error") as one line naming
    storage.root; None for any other OSError."""
    text = " ".join(str(error).split())
    if "AWS Error" not in text:
        return None
    return InputError(f"storage.root: the S3 store failed ({text[:300]}); allowed: an S3 store that answers at "
                      "storage.endpoint_override (or AWS_ENDPOINT_URL) with credentials that may use the bucket")
