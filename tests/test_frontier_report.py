"""benchmarks/frontier.py: resumable rows (a key missing from a row is the frontier's default) and the report
(one table row per cell, each ablation marked with what it changes, speed only for the frontier's own cells)."""

from __future__ import annotations

import pytest

from benchmarks.frontier import VARIANT_DEFAULTS, find_row, main, parse_ablation, report, variant_label

PROTO = {"calibration": 4, "layerwise_steps": 1, "probe_r": 4, "arc_limit": 3, "sampled": 4}


def _cell(r: int, ratio: float, **extra) -> dict:
    return {"kind": "cell", "protocol": PROTO, "fraction": 0.5, "r": r, "lisa_layers": [2, 3, 4], "num_layers": 6,
            "pydoc": {"ppl_ratio": ratio, "kl": ratio - 1}, "kv_bytes_per_token_fp16": {"saving": 0.2},
            "compact_bytes_fp32": {"saving": 0.03}, "qk_compression": 64 / r, **extra}


def test_rows_are_found_by_allocation_and_legacy_rows_are_uniform():
    legacy = _cell(16, 1.1)
    ablation = _cell(16, 1.05, allocation="sensitivity", layer_ranks={"2": 8, "3": 24, "4": 16})
    greedy = _cell(16, 1.2, search="greedy", lr=2e-3)
    rows = [legacy, ablation, greedy, {**_cell(16, 1.2), "protocol": {**PROTO, "calibration": 2}}]
    assert find_row(rows, "cell", PROTO, fraction=0.5, r=16, allocation="uniform") is legacy
    assert find_row(rows, "cell", PROTO, fraction=0.5, r=16, allocation="sensitivity") is ablation
    assert find_row(rows, "cell", PROTO, fraction=0.5, r=12, allocation="uniform") is None
    assert find_row(rows, "cell", PROTO, fraction=0.5, r=16, search="greedy", lr=2e-3, steps=30) is greedy
    assert find_row(rows, "cell", PROTO, fraction=0.5, r=16, search="greedy", lr=5e-4) is None


def test_variant_labels_name_what_an_ablation_changes():
    assert variant_label(_cell(16, 1.1)) == variant_label(_cell(16, 1.1, steps=30, distill="topk")) == ""
    assert variant_label(_cell(16, 1.1, search="greedy", distill="sequence", steps=90, lr=2e-3)) == (
        "greedy layers, sequence-level distillation, 90 e2e steps, lr 0.002")


def test_ablations_parse_against_the_defaults_and_name_a_typo():
    assert parse_ablation("search=greedy,lr=0.002") == {**VARIANT_DEFAULTS, "search": "greedy", "lr": 0.002}
    assert parse_ablation("steps=90")["steps"] == 90
    for bad, message in (("serch=greedy", "KEY one of allocation"), ("steps=many", "steps takes a int"),
                         ("distill=seq", "distill is one of topk, sequence")):
        with pytest.raises(SystemExit, match=message):
            parse_ablation(bad)


def test_speed_is_refused_for_ablation_cells(capsys):
    with pytest.raises(SystemExit, match="--speed measures the frontier's own cells"):
        main(["--speed", "--layer-search", "greedy"])


def test_report_marks_the_ablation_and_gives_speed_to_uniform_cells_only(tmp_path):
    speed = {"kind": "speed", "protocol": PROTO, "fraction": 0.5, "r": 16,
             "speed": {"ratio_median": 1.1, "ratio_min": 1.0, "ratio_max": 1.2}}
    rows = [_cell(16, 1.1), _cell(16, 1.05, allocation="sensitivity"), _cell(16, 1.07, distill="sequence"),
            _cell(32, 1.02), speed]
    table = report(rows, PROTO, None).splitlines()
    assert len(table) == 2 + 4
    assert "| 3 / 6 | 16 (4.0x) |" in table[2] and "1.10 (1.00–1.20)" in table[2]
    assert "16 per layer by sensitivity (4.0x)" in table[3] and table[3].endswith("| — |")
    assert "16 sequence-level distillation (4.0x)" in table[4] and table[4].endswith("| — |")
    assert "1.020 / 0.020" in table[5]
