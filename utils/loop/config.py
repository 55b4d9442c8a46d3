"""The fine-tuning loop's settings: every field is a parameter of the spec (utils.params.FINE_TUNING), whose
default, type and range it takes, so tier 3, utils.train and test_fine_tuning share one set of defaults."""

import os
from dataclasses import dataclass

from utils.params import FINE_TUNING, ParamError

_SPEC = {p.name: p for p in FINE_TUNING}
_D = {name: p.default for name, p in _SPEC.items()}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _D["steps"]                  # optimizer steps (epochs, when given, decides instead)
    epochs: float = _D["epochs"]              # passes over the training tokens
    batch_size: int = _D["batch_size"]        # per rank under torchrun
    seq_len: int = _D["seq_len"]
    lr: float = _D["lr"]
    weight_decay: float = _D["weight_decay"]
    warmup_steps: int = _D["warmup_steps"]    # learning-rate warm-up (None: 10% of the steps)
    grad_accum_steps: int = _D["grad_accum_steps"]
    max_grad_norm: float = _D["max_grad_norm"]
    seed: int = _D["seed"]
    eval_interval: int = _D["eval_interval"]
    eval_batches: int = _D["eval_batches"]    # 0: no evaluation (speed trials)
    max_skipped_in_a_row: int = _D["max_skipped_in_a_row"]  # None: never stop for skipped steps
    checkpoint_every: int = _D["checkpoint_every"]
    checkpoint_dir: str = _D["checkpoint_dir"]  # '' : no checkpoints
    keep_checkpoints: int = _D["keep_checkpoints"]
    resume: bool = _D["resume"]
    parallel: str = _D["parallel"]            # under torchrun: 'ddp' or 'fsdp2'
    compile: bool = _D["compile"]
    log_every: int = _D["log_every"]          # 0: every step on a CPU, every LOG_EVERY_ACCELERATOR on a GPU

    @classmethod
    def from_params(cls, params: dict, where: str = "the fine-tuning loop") -> "TrainConfig":
        """A config from parameters, each name and value checked against the spec before any work starts;
        names the loop does not know are refused, listing the ones it does."""
        unknown = sorted(set(params) - set(_SPEC))
        if unknown:
            raise ParamError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for {where}; known: {sorted(_SPEC)}")
        values = {name: _SPEC[name].check(_as_text(value)) for name, value in params.items()}
        config = cls(**values)
        if (config.resume or config.checkpoint_every) and not config.checkpoint_dir:
            raise ParamError("resume and checkpoint_every need a checkpoint_dir to read and write checkpoints")
        return config


def _as_text(value):
    """A path (checkpoint_dir) as the text the spec holds."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value

