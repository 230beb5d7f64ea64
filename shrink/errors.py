"""Errors that reach the user as one clear line."""


class ShrinkError(ValueError):
    """A bad input or unavailable asset, found before expensive work starts."""


class NumericalError(RuntimeError):
    """NaN/Inf or unusable statistics: reported with where they appeared, never propagated."""
