"""Shared fixtures: the toy tokenizer and a tiny randomly initialised toy model, built once."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from blockem.config import load_yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def default_config() -> dict:
    return load_yaml(REPO / "config" / "config.yaml")


@pytest.fixture()
def config(default_config) -> dict:
    return copy.deepcopy(default_config)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from blockem.toy.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from blockem.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    import torch

    from blockem.models import build_toy_model

    torch.manual_seed(0)
    return build_toy_model(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                           hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                           max_length=64).eval()
