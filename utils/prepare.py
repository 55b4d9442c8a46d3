"""What a run resolves once, before any check or step: checked parameters, the device, the precision plan,
the model on that device with its task probed, its data, and the record of what ran."""

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from utils.environment import run_record
from utils.loop.config import fitted_seq_len
from utils.models import UnsupportedModel, load_model, load_task_data, load_tokenizer, model_max_len, probe_model
from utils.params import TRAIN_PARAMS, check_params, check_values
from utils import device as dev
from utils.precision import PrecisionPlan, comparison_plan, fp32_plan, resolve


@dataclass
class Prepared:
    """What a tier resolves once, before any check runs, and passes to every check."""

    params: dict
    model: torch.nn.Module
    device: torch.device
    plan: PrecisionPlan
    data: object      # the task's data (utils.data), tokenized as the run says
    seq_len: int      # the seq_len parameter, capped at the model's maximum
    record: dict      # what ran: device, precision, versions, task, tokens, data


def prepare(tier: int, model, params: dict, data=None) -> Prepared:
    """A tier's run, prepared (an unsupported model is refused here, with the reason). `model` (an nn.Module or a spec)
    overrides the `model` parameter; `device` may be a torch.device. A tier with a precision compares it with fp32."""
    p = check_params(tier, _device_as_text(params))
    device = dev.resolve_device(p["device"])
    plan = (comparison_plan(p["precision"], device) if "precision" in p
            else fp32_plan(device, f"tier {tier} runs its checks in fp32"))
    if p.get("fp32_modules"):
        plan = replace(plan, fp32_modules=tuple(p["fp32_modules"]))
    return _load(p, model, device, plan, data)


def prepare_training(model, params: dict, data=None) -> Prepared:
    """prepare() for utils.train: its parameters, and the precision asked for (fp32 too), not a comparison."""
    p = check_values(_device_as_text(params), {q.name: q for q in TRAIN_PARAMS}, "utils.train")
    device = dev.resolve_device(p["device"])
    return _load(p, model, device, resolve(p["precision"], device), data)


def _device_as_text(params: dict) -> dict:
    return {**params, "device": str(params["device"])} if isinstance(params.get("device"), torch.device) else params


def _load(p: dict, model, device: torch.device, plan: PrecisionPlan, data) -> Prepared:
    torch.manual_seed(p["seed"])  # the model's initial weights are part of the run: same seed, same weights
    spec = p["model"] if model is None else model
    model = load_model(spec, task=p["task"], **p["model_kwargs"]).to(device)
    task = probe_model(model, p["task"])
    own = isinstance(spec, str) and spec.startswith("hf:") and _has_tokenizer(spec)  # an hf: model's own tokenizer
    tokenizer = load_tokenizer(p["tokenizer"]) if p["tokenizer"] else load_tokenizer(spec) if own else None
    seq_len = fitted_seq_len(model, p["seq_len"])
    try:
        data = load_task_data(model, data, seq_len, tokenizer)
    except UnsupportedModel as e:  # found only now, from the model's outputs: say which model parameter it was
        raise UnsupportedModel(f"parameter 'model' {spec if isinstance(spec, str) else type(model).__name__!r}: {e}") from None
    record = {**run_record(device, plan, p.get("tf32")), "task": task, "seq_len": seq_len, "max_len": model_max_len(model),
              "data": getattr(data, "source", type(data).__name__), "vocab": getattr(data, "vocab_size", None)}
    return Prepared(p, model, device, plan, data, seq_len, record)


def _has_tokenizer(spec: str) -> bool:
    """A hub name is expected to have one; a local model folder may simply have none (then: bytes)."""
    folder = Path(spec.removeprefix("hf:"))
    return not folder.is_dir() or any(folder.glob("tokenizer*")) or (folder / "vocab.json").exists()
