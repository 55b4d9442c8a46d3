"""User-style models for tests: Hugging Face style outputs, tuples, and planted faults."""

from dataclasses import dataclass

import torch
import torch.nn as nn

from utils.models import build_model


@dataclass
class CausalLMOutput:
    """The shape of a Hugging Face ModelOutput: an object with .logits (and .loss)."""

    logits: torch.Tensor
    loss: torch.Tensor = None


class HFStyleLM(nn.Module):
    """Wraps the tiny GPT and returns an object with .logits, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.inner = build_model("gpt-tiny")

    def forward(self, input_ids, attention_mask=None):
        return CausalLMOutput(logits=self.inner(input_ids, attention_mask))


class TupleLM(nn.Module):
    """Returns (logits, loss) like many research codebases."""

    def __init__(self):
        super().__init__()
        self.inner = build_model("gpt-tiny")

    def forward(self, input_ids, attention_mask=None):
        logits = self.inner(input_ids, attention_mask)
        return logits, logits.float().logsumexp(-1).mean()


def make_hf_style():
    torch.manual_seed(0)
    return HFStyleLM()


def make_tuple_lm():
    torch.manual_seed(0)
    return TupleLM()


def make_not_a_module():
    return "not a model"


def make_failing():
    raise RuntimeError("weights file missing")


# --- planted faults: each must make exactly the check it targets fail -------------------------------

class DetachedLayer(nn.Module):
    """An extra projection that the forward never uses: its parameters get no gradient."""

    task = "causal-lm"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = build_model("gpt-tiny")
        self.unused_head = nn.Linear(64, 256)

    def forward(self, input_ids):
        return self.inner(input_ids)


class EmitsNaN(nn.Module):
    """log of a negative number in the forward: every logit is NaN."""

    task = "causal-lm"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = build_model("gpt-tiny")

    def forward(self, input_ids):
        return self.inner(input_ids) + torch.log(torch.tensor(-1.0))


def zero_initialized():
    torch.manual_seed(0)
    model = build_model("gpt-tiny")
    nn.init.zeros_(model.blocks[0].mlp[0].weight)
    return model


class IgnoresSequenceLength(nn.Module):
    """Always returns 8 positions, whatever the input length (a hard-coded reshape)."""

    task = "causal-lm"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = build_model("gpt-tiny")

    def forward(self, input_ids):
        return self.inner(input_ids)[:, -1:, :].repeat(1, 8, 1)


class OverflowsFp16(nn.Module):
    """Activations of blocks.1.mlp.0 scaled by 1e6: fine in fp32 and bf16, inf in fp16 (max 65504)."""

    task = "causal-lm"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = build_model("gpt-tiny")
        self.inner.blocks[1].mlp[0].register_forward_hook(lambda m, i, o: o * 1e6)

    def forward(self, input_ids):
        return self.inner(input_ids)
