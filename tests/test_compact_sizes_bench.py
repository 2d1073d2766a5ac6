"""benchmarks/compact_sizes.py --rss: the per-form child measurement and the table, on a tiny random model."""

from __future__ import annotations

from peft import get_peft_model

from benchmarks.compact_sizes import RSS_FORMS, print_rss, rss_one
from lisa_peft import LisaConfig
from tests.helpers.tiny_models import tiny_llama


def test_rss_one_loads_each_form_and_prints_the_table(tmp_path, capsys):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LisaConfig(lisa_layers=[3, 4, 5], init_lisa_weights="identity"))
    model.save_pretrained(tmp_path / "adapter")
    model.merge_and_unload().save_pretrained(tmp_path / "compact")
    results = [rss_one(form, str(tmp_path)) for form in RSS_FORMS]  # in-process here; fresh processes in --rss
    assert [r["class"] for r in results] == ["LlamaForCausalLM", "PeftModelForCausalLM", "LisaLlamaForCausalLM"]
    for r in results:
        for point in ("before", "after", "forward"):
            assert set(r[point]) == {"VmRSS", "RssAnon", "RssFile", "VmHWM"} and r[point]["VmRSS"] > 0
    assert results[2]["parameter_bytes"] < results[0]["parameter_bytes"] < results[1]["parameter_bytes"]
    print_rss(results)
    table = capsys.readouterr().out
    assert "| base |" in table and "| PEFT LiSA |" in table and "| compact |" in table
