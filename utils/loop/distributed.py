"""Several processes, one loop: what the fine-tuning loop needs from torch.distributed (under torchrun: utils.train).
Each rank draws the same global batch from the seeded generator and keeps its rows, so N ranks of batch B/N see exactly
what one process of batch B sees. DDP averages the gradients; FSDP2 (fully_shard) shards parameters, gradients and optimizer
state and casts with a MixedPrecisionPolicy; its fp16 GradScaler is the sharded one, which agrees on skipped steps across
ranks (under DDP the all-reduced gradients already agree)."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

try:  # FSDP2 is torch.distributed.fsdp.fully_shard from torch 2.6 on; older torch runs DDP only
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:
    fully_shard = MixedPrecisionPolicy = None

from utils import device as dev
from utils.precision import PrecisionPlan


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks() -> Ranks:
    """This process's rank and the world size (0 and 1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def init_from_env(device_request: str) -> torch.device:
    """Join the process group torchrun describes: NCCL on the GPU of this rank's LOCAL_RANK, gloo on CPU."""
    if "RANK" not in os.environ:
        raise RuntimeError("utils.train runs under torchrun, which sets RANK and WORLD_SIZE: "
                           "torchrun --nproc_per_node 2 -m utils.train ...")
    device = dev.local_gpu(device_request, int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("gloo" if device is None else "nccl")
    return torch.device("cpu") if device is None else device


def fsdp2_unavailable() -> str:
    """Why FSDP2 cannot run with this torch, or '' when it can."""
    return "" if fully_shard else (f"FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6) is not in torch "
                                   f"{torch.__version__}: use parallel='ddp'")


def wrap(model: nn.Module, parallel: str, plan: PrecisionPlan, device: torch.device) -> nn.Module:
    """The model under DDP or FSDP2: FSDP2 shards each element of every nn.ModuleList (the blocks), then the root."""
    if parallel == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if why_not := fsdp2_unavailable():
        raise RuntimeError(why_not)
    policy = MixedPrecisionPolicy(param_dtype=plan.autocast_dtype if plan.enabled else None, reduce_dtype=torch.float32)
    blocks = [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def gradient_sync(model: nn.Module, parallel: str, sync: bool):
    """A context in which backward all-reduces gradients (sync) or not: in an accumulation window only the last does."""
    if parallel == "ddp" and not sync:
        return model.no_sync()
    if parallel == "fsdp2":
        model.set_requires_gradient_sync(sync)
    return torch.enable_grad()  # a do-nothing context for the other cases


def rows(tensor: torch.Tensor, r: Ranks) -> torch.Tensor:
    """This rank's equal share of a global batch's rows."""
    share = len(tensor) // r.world
    return tensor[r.rank * share:(r.rank + 1) * share]


def mean_over_ranks(value, r: Ranks):
    """The mean over ranks of a number or a tensor (untouched in one process); NCCL reduces CUDA tensors only, so there
    a number travels on this rank's GPU."""
    if r.world == 1:
        return value
    if isinstance(value, torch.Tensor):
        total = value.clone()
        dist.all_reduce(total)
        return total / r.world
    t = torch.tensor(float(value), device=dev.current_gpu() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t) / r.world


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's total gradient norm) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def training_state(model: nn.Module, optimizer) -> tuple:
    """Full (unsharded) model and optimizer state dicts on the CPU; a collective under FSDP2 (every rank calls it)."""
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_training_state(model: nn.Module, optimizer, model_state: dict, optimizer_state: dict):
    """Load full state dicts into a plain, DDP or FSDP2 model (each rank keeps its shard)."""
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))


def gather(obj, r: Ranks) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if r.world == 1:
        return [obj]
    out = [None] * r.world
    dist.all_gather_object(out, obj)
    return out
