"""Shared fixtures: tiny random models built from configs and a tokenizer trained locally.

Everything here is offline and seeded; nothing touches the hub.
"""

from __future__ import annotations

import os

import pytest
import torch

from eardrum.adapters.tiny import (  # noqa: F401  (re-exported for the tests)
    build_tokenizer,
    save_tiny_bases,
    tiny_llama,
    tiny_qwen2,
    tiny_w2v,
    tiny_whisper,
    w2v_feature_extractor,
    whisper_feature_extractor,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (real weights)")
    parser.addoption("--run-gpu", action="store_true", help="also run tests marked gpu (needs CUDA)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, flag in (("slow", "--run-slow"), ("gpu", "--run-gpu")):
        if config.getoption(flag):
            continue
        skip = pytest.mark.skip(reason=f"marked {marker}; run with {flag}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    return build_tokenizer("llama3")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny random base models saved as local transformers folders (the way users name local sources)."""
    return save_tiny_bases(tmp_path_factory.mktemp("bases"))
