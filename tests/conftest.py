"""Shared fixtures: tiny models so each test runs in well under a second of compute."""

import pytest
import torch

from utils.models import build_model


@pytest.fixture
def tiny_gpt():
    torch.manual_seed(0)
    return build_model("gpt-tiny")


@pytest.fixture
def tiny_encoder():
    torch.manual_seed(0)
    return build_model("encoder-tiny")
