"""The seed's precision module, kept as its public path: compute_effective_precision and AmpWandbCallback import
from here as the seed's callers expect. Precision lives in utils.precision, the callback in utils.loop.callbacks."""

from utils.loop.callbacks import AmpWandbCallback
from utils.precision import PrecisionPlan, compute_effective_precision, resolve

resolve_precision = resolve  # the seed's name for utils.precision.resolve

__all__ = ["AmpWandbCallback", "PrecisionPlan", "compute_effective_precision", "resolve_precision"]
