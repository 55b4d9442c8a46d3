"""Training FLOPs per token: counted on the actual model by torch's FlopCounterMode, with the analytic GPT
formula kept as a cross-check for this project's models."""

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from utils.models import compute_loss


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls (2-D weights not only used as embedding lookups).
    A weight tied between an embedding and the output layer counts once, as a matmul."""
    counted = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.dim() >= 2 and not isinstance(module, nn.Embedding):
                counted[id(p)] = p.numel()
    return sum(counted.values()) or sum(p.numel() for p in model.parameters())


def training_flops_per_token(model: nn.Module, seq_len: int):
    """The analytic count for this project's GPT layout: 6 N per token (forward 2N, backward 4N) plus
    attention's 12 * layers * seq_len * d_model (PaLM, appendix B). None for a model without n_layer and
    d_model on its config: the formula would be a guess there. A cross-check of measured_flops_per_token."""
    cfg = getattr(model, "config", None)
    if not (hasattr(cfg, "n_layer") and hasattr(cfg, "d_model")):
        return None
    return 6 * matmul_params(model) + 12 * cfg.n_layer * seq_len * cfg.d_model


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels; the CPU one (what SDPA runs here) gets the same formula.
_CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
                        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}


def measured_flops_per_token(model: nn.Module, batch) -> float:
    """Training FLOPs per token of the actual model, counted by torch's FlopCounterMode over one forward
    and backward of `batch`: right for any architecture, where a formula assumes one layout."""
    x, y = batch
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with counter:
        compute_loss(model, x, y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.numel()
