"""AmpWandbCallback: AMP state to Weights & Biases, from a Lightning Trainer or from this project's loop."""

import functools
import importlib
import warnings

from utils.precision import PrecisionPlan, carries_loss_scale


@functools.cache
def _lightning_callback_base():
    """Lightning's Callback class, or None without Lightning: imported on first use (optional, seconds to import)."""
    for package in ("lightning.pytorch", "pytorch_lightning"):  # the older package name second
        try:
            return importlib.import_module(package).Callback
        except ImportError:
            pass
    return None


@functools.cache
def _with_base(cls, base):
    return type(cls.__name__, (cls, base), {"__module__": cls.__module__, "__doc__": cls.__doc__})


class AmpWandbCallback:
    """Logs amp/enabled (0/1), amp/precision (as given) and, for fp16, amp/loss_scale to Weights & Biases: per epoch as a
    Lightning Callback (where Lightning is installed; a plain class otherwise, so importing never needs it), per optimizer
    step with amp/skipped_steps in this project's loop (test_fine_tuning(callbacks=[...])). `log`: any callable(dict,
    step=int); by default wandb.log while a W&B run is active, else nothing. A logging error is warned about, never raised."""

    def __new__(cls, *args, **kwargs):
        base = _lightning_callback_base()
        return super().__new__(_with_base(cls, base) if base is not None and not issubclass(cls, base) else cls)

    def __init__(self, enabled: bool, precision: str, log=None):
        self.enabled, self.precision = bool(enabled), str(precision)
        self.skipped_steps = 0
        self._log = log

    @classmethod
    def from_plan(cls, plan: PrecisionPlan, log=None) -> "AmpWandbCallback":
        return cls(plan.enabled, plan.precision, log)

    def _get_loss_scale(self, trainer):
        """The Lightning trainer's GradScaler scale as an unrounded float; None when any piece of the chain is missing."""
        scaler = getattr(getattr(getattr(trainer, "strategy", None), "precision_plugin", None), "scaler", None)
        try:
            return float(scaler.get_scale())
        except Exception:  # no scaler (None has no get_scale), or one that cannot say
            return None

    def _logger(self):
        if self._log is not None:
            return self._log
        try:
            import wandb  # optional dependency: only needed when a user tracks runs in W&B
        except ImportError:
            return None
        return wandb.log if wandb.run is not None else None

    def _emit(self, metrics: dict, loss_scale, step: int):
        log = self._logger()
        if log is None:
            return
        metrics = {"amp/enabled": int(self.enabled), "amp/precision": self.precision, **metrics}
        if carries_loss_scale(self.precision) and loss_scale is not None:
            metrics["amp/loss_scale"] = float(loss_scale)
        try:
            log(metrics, step=int(step))
        except Exception as e:  # a logging failure must never stop training
            warnings.warn(f"AmpWandbCallback could not log at step {step}: {type(e).__name__}: {e}", stacklevel=2)

    def on_train_epoch_end(self, trainer, pl_module):
        """Lightning's hook: once per training epoch."""
        self._emit({}, self._get_loss_scale(trainer), getattr(trainer, "current_epoch", 0))

    def on_step_end(self, record: dict):
        """test_fine_tuning's hook: once per optimizer step, in order, at the loop's log points."""
        self.skipped_steps += int(record["skipped"])
        self._emit({"amp/skipped_steps": self.skipped_steps}, record["loss_scale"], record["step"])
