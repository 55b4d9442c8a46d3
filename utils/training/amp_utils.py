"""The seed's precision module, kept as its public path for the seed's callers: the names live in the modules imported below."""

from utils.loop.callbacks import AmpWandbCallback
from utils.precision import PrecisionPlan, compute_effective_precision, resolve

resolve_precision = resolve  # the seed's name for utils.precision.resolve

__all__ = ["AmpWandbCallback", "PrecisionPlan", "compute_effective_precision", "resolve_precision"]
