"""Stand-ins the tests drive by hand where the real thing would make them wait."""


class Clock:
    """A monotonic clock the test moves by hand: patched in for time.monotonic."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
