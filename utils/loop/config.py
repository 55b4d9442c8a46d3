"""The fine-tuning loop's settings, TrainConfig: one field per parameter of the spec's FINE_TUNING (utils.params),
with its default, type and range, so tier 3, utils.train and test_fine_tuning share one set of defaults."""

import os
from dataclasses import field, make_dataclass

from utils.models import model_max_len
from utils.params import FINE_TUNING, LOOP_SPEC as _SPEC, ParamError


def fitted_seq_len(model, seq_len: int) -> int:
    """seq_len, capped at the longest sequence the model takes: the one rule for every tier and the loop."""
    return min(seq_len, model_max_len(model))


def _from_params(cls, params: dict, where: str = "the fine-tuning loop"):
    """A config from parameters, each name and value checked against the spec before any work starts (a path
    is accepted for checkpoint_dir); names the loop does not know are refused, listing the ones it does."""
    if unknown := sorted(set(params) - set(_SPEC)):
        raise ParamError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for {where}; known: {sorted(_SPEC)}")
    values = {name: _SPEC[name].check(os.fspath(v) if isinstance(v, os.PathLike) else v) for name, v in params.items()}
    if values.get("checkpoint_dir"):  # absolute once, here: a resume finds its checkpoints however the folder was spelled
        values["checkpoint_dir"] = os.path.abspath(values["checkpoint_dir"])
    config = cls(**values)
    if (config.resume or config.checkpoint_every) and not config.checkpoint_dir:
        raise ParamError("resume and checkpoint_every need a checkpoint_dir to read and write checkpoints")
    return config


TrainConfig = make_dataclass("TrainConfig", [(p.name, p.type, field(default=p.default)) for p in FINE_TUNING], frozen=True,
                             namespace={"from_params": classmethod(_from_params), "__module__": __name__,
                                        "__doc__": "The loop's settings; see utils.params.FINE_TUNING for each one."})
