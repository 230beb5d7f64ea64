"""Errors that reach the user as one clear line."""


class ShrinkError(ValueError):
    """A bad input or unavailable asset, found before expensive work starts."""


class NumericalError(RuntimeError):
    """NaN/Inf or unusable statistics: reported with where they appeared, never propagated."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (its type's name when it has none): what a
    one-line report of a multi-line library error keeps."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
