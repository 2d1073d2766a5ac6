"""Shared fixtures: tiny random LLaMA models built in the tests (no downloads)."""

from __future__ import annotations

import os

# Before anything imports triton (transformers does, via torch._dynamo): Triton kernels run in
# the CPU interpreter in tests. Start pytest with TRITON_INTERPRET=0 on a GPU to run them natively.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lisa_peft  # noqa: F401  (registers the LISA PEFT method)
from tests.helpers.hub_fixtures import hub_client, hub_server  # noqa: F401  (offline Hub test infrastructure)
from tests.helpers.tiny_models import VOCAB, tiny_llama, tiny_llama_config  # noqa: F401  (re-exported)


@pytest.fixture(params=[4, 2], ids=["mha", "gqa"])
def kv_heads(request) -> int:
    return request.param


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 12), generator=generator)
