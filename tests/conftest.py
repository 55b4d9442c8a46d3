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


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is: skipped, with the reason, everywhere else."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
