"""benchmarks/frontier.py: resumable rows (uniform cells found also without the "allocation" key) and the
report (one table row per cell, the per-layer-rank ablation marked, speed only for uniform cells)."""

from __future__ import annotations

from benchmarks.frontier import find_row, report

PROTO = {"calibration": 4, "layerwise_steps": 1, "steps": 1, "lr": 1e-3, "probe_r": 4, "arc_limit": 3, "sampled": 4}


def _cell(r: int, ratio: float, **extra) -> dict:
    return {"kind": "cell", "protocol": PROTO, "fraction": 0.5, "r": r, "lisa_layers": [2, 3, 4], "num_layers": 6,
            "pydoc": {"ppl_ratio": ratio, "kl": ratio - 1}, "kv_bytes_per_token_fp16": {"saving": 0.2},
            "compact_bytes_fp32": {"saving": 0.03}, "qk_compression": 64 / r, **extra}


def test_rows_are_found_by_allocation_and_legacy_rows_are_uniform():
    legacy = _cell(16, 1.1)
    ablation = _cell(16, 1.05, allocation="sensitivity", layer_ranks={"2": 8, "3": 24, "4": 16})
    rows = [legacy, ablation, {**_cell(16, 1.2), "protocol": {**PROTO, "steps": 2}}]
    assert find_row(rows, "cell", PROTO, fraction=0.5, r=16, allocation="uniform") is legacy
    assert find_row(rows, "cell", PROTO, fraction=0.5, r=16, allocation="sensitivity") is ablation
    assert find_row(rows, "cell", PROTO, fraction=0.5, r=12, allocation="uniform") is None


def test_report_marks_the_ablation_and_gives_speed_to_uniform_cells_only(tmp_path):
    speed = {"kind": "speed", "protocol": PROTO, "fraction": 0.5, "r": 16,
             "speed": {"ratio_median": 1.1, "ratio_min": 1.0, "ratio_max": 1.2}}
    rows = [_cell(16, 1.1), _cell(16, 1.05, allocation="sensitivity"), _cell(32, 1.02), speed]
    table = report(rows, PROTO, None).splitlines()
    assert len(table) == 2 + 3
    assert "| 3 / 6 | 16 (4.0x) |" in table[2] and "1.10 (1.00–1.20)" in table[2]
    assert "16 per layer by sensitivity (4.0x)" in table[3] and table[3].endswith("| — |")
    assert "1.020 / 0.020" in table[4]
