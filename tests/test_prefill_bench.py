"""benchmarks/prefill.py: one run per variant through `generate` / `forward`, and the ratio table (tiny model)."""

from __future__ import annotations

import pytest

from benchmarks.prefill import build_model, growing_cache_kwargs, main, median_rows, parse_layers, ratio_table, run_one
from tests.helpers.tiny_models import tiny_llama


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_base")
    tiny_llama().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("variant", ["base", "base-growing", "lisa", "lisa-chunk=8", "lisa-r=4"])
def test_run_one_generate_measures_prefill_and_decode(tiny_path, variant):
    row = run_one(variant, tokens=20, new_tokens=4, call="generate", layers=[3, 4, 5], model_path=tiny_path)
    assert row["variant"] == variant and row["tokens"] == 20
    assert row["prefill_s"] > 0 and row["decode_tokens_per_s"] > 0
    assert row["peak_rss_mb"] >= row["loaded_rss_mb"] > 0


def test_variants_set_the_chunk_size_and_the_rank(tiny_path):
    assert build_model("lisa-r=4", [3, 4], tiny_path).peft_config["default"].r == 4
    assert build_model("lisa-chunk=8", [3, 4], tiny_path).peft_config["default"].prefill_chunk_size == 8


def test_base_growing_control_stores_every_layer_growing_and_generates_the_same_tokens(tiny_path):
    import torch

    from lisa_peft.tuners.lisa.growing_cache import GrowingLayer

    model = build_model("base-growing", [3], tiny_path)
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    kwargs = growing_cache_kwargs(model)
    (cache,) = kwargs.values()
    with torch.no_grad():
        grown = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, **kwargs)
        plain = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert len(cache.layers) == model.config.num_hidden_layers
    assert all(type(layer) is GrowingLayer for layer in cache.layers)
    assert cache.get_seq_length() == 9 + 6 - 1
    assert torch.equal(grown, plain)


def test_run_one_forward_and_bad_inputs(tiny_path):
    row = run_one("lisa", tokens=12, new_tokens=0, call="forward", layers=[3, 4, 5], model_path=tiny_path)
    assert row["prefill_s"] > 0 and "decode_tokens_per_s" not in row
    with pytest.raises(ValueError, match="unknown variant"):
        run_one("lora", tokens=12, new_tokens=0, call="forward", layers=[3], model_path=tiny_path)
    with pytest.raises(ValueError, match="unknown call"):
        run_one("base", tokens=12, new_tokens=0, call="score", layers=[3], model_path=tiny_path)


def test_parse_layers_and_ratio_table():
    assert parse_layers("demo")[:3] == [6, 7, 8] and len(parse_layers("demo")) == 12
    assert parse_layers("3-5") == [3, 4, 5] and parse_layers("5,3") == [3, 5]
    rows = [
        {"variant": "base", "tokens": 1024, "peak_rss_mb": 1000, "prefill_s": 2.0, "decode_tokens_per_s": 10.0},
        {"variant": "lisa", "tokens": 1024, "peak_rss_mb": 1100, "prefill_s": 3.0, "decode_tokens_per_s": 11.0},
    ]
    table = ratio_table(rows)
    assert "| 1024 | lisa | 1100 (x1.10) | 3.00 (x1.50) | 11.00 (x1.10) |" in table
    assert "| 1024 | base | 1000 | 2.00 | 10.00 |" in table


def test_median_rows_take_the_median_per_cell_and_skip_errors():
    rows = [
        {"variant": "base", "tokens": 8, "prefill_s": 2.0, "peak_rss_mb": 100, "decode_tokens_per_s": 5.0},
        {"variant": "lisa", "tokens": 8, "prefill_s": 9.0, "peak_rss_mb": 110, "decode_tokens_per_s": None},
        {"variant": "lisa", "tokens": 8, "prefill_s": 3.0, "peak_rss_mb": 130},
        {"variant": "lisa", "tokens": 8, "error": "Killed"},
        {"variant": "base", "tokens": 8, "prefill_s": 4.0, "peak_rss_mb": 120, "decode_tokens_per_s": 7.0},
        {"variant": "lisa", "tokens": 8, "prefill_s": 4.0, "peak_rss_mb": 120},
    ]
    base, lisa = median_rows(rows)
    assert (base["variant"], base["runs"], base["prefill_s"], base["peak_rss_mb"]) == ("base", 2, 3.0, 110)
    assert base["decode_tokens_per_s"] == 6.0 and isinstance(base["peak_rss_mb"], int)
    assert "| 8 | lisa | 120 (x1.09) | 4.00 (x1.33) | n/a |" in ratio_table([base, lisa])  # even counts too
    assert (lisa["runs"], lisa["prefill_s"], lisa["peak_rss_mb"], lisa["decode_tokens_per_s"]) == (3, 4.0, 120, None)


def test_repeats_must_be_positive():
    with pytest.raises(SystemExit):
        main(["--repeats", "0"])
