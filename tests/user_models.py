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
