"""The refusals every layer may raise, below all of them: a model or a precision this suite cannot run, with why."""


class ModelLoadError(ValueError):
    """A model spec that does not resolve, or a factory that fails."""


class UnsupportedModel(ModelLoadError):
    """A model the suite cannot validate or train, refused with the reason before any check runs."""


class UnsupportedPrecision(UnsupportedModel):
    """A precision this device, this install or this model cannot run, refused with the reason."""
