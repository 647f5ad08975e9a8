"""The one exception the curve package raises for data it will not fit."""


class CurveFitError(ValueError):
    """A fit was refused; the message is one line saying why."""
