"""benchmarks/train_memory.py: one training step per variant with and without checkpointing (tiny model)."""

from __future__ import annotations

import pytest

from benchmarks.train_memory import run_one, table
from tests.helpers.tiny_models import tiny_llama


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_base")
    tiny_llama().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_run_one_trains_the_intended_weights(tiny_path, checkpointing):
    rows = [run_one(v, 16, checkpointing, [3, 4, 5], tiny_path) for v in ("base", "lisa")]
    base, lisa = rows
    assert base["trainable_params"] > 0 and lisa["trainable_params"] > 0
    for row in rows:
        assert row["peak_rss_mb"] >= row["loaded_rss_mb"] > 0 and row["loss"] > 0
    assert "| 16 |" in table(rows)
    with pytest.raises(ValueError, match="unknown variant"):
        run_one("lora", 16, checkpointing, [3], tiny_path)
