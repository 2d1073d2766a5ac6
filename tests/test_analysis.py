"""Adjacent-layer attention similarity (lisa_peft.evaluation.analysis) and calibration text (lisa_peft.pipeline.data).

Tiny random LLaMA models and a word-level tokenizer built here; nothing is downloaded."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lisa_peft.cli import main
from lisa_peft.evaluation.analysis import adjacent_layer_similarity, analyze, attention_maps, pairwise_js_sums
from lisa_peft.pipeline.data import chunk_token_windows, load_texts

WORDS = "the quick brown fox jumps over a lazy dog while small cats run under green trees and birds sing".split()


def tiny_llama(vocab_size: int = len(WORDS) + 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
        intermediate_size=128, vocab_size=vocab_size, bos_token_id=None, eos_token_id=1, pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: <unk>=0, </s>=1, then WORDS; no pad token."""
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(len(WORDS), (400,), generator=generator).tolist()
    path.write_text(" ".join(WORDS[i] for i in idx), encoding="utf-8")
    return path


def random_maps(batch: int, heads: int, t: int, scale: float = 4.0, seed: int = 0) -> torch.Tensor:
    """Causal attention probabilities [B, H, T, T] with distinct, fairly peaked heads."""
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(batch, heads, t, t, generator=generator)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def reference_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JS per row, straight from the definition 0.5 KL(p||m) + 0.5 KL(q||m) in nats: [..., K] -> [...]."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a / b).log(), torch.zeros_like(a)).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


# --- attention maps -----------------------------------------------------------------------------------


def test_attention_maps_shapes_causality_and_restored_implementation() -> None:
    model = tiny_llama()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(2, 20, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    maps = attention_maps(model, ids, mask)
    assert len(maps) == 4
    future = torch.ones(9, 9, dtype=torch.bool).triu(diagonal=1)
    real_rows = mask.bool()[:, :, None].expand(2, 9, 9)
    for probs in maps:
        assert probs.shape == (2, 4, 9, 9) and probs.dtype == torch.float32
        assert torch.allclose(probs[0].sum(-1), torch.ones(4, 9), atol=1e-5)
        for b in range(2):  # rows of real tokens are causal; padding rows are whatever the model makes them
            assert torch.all(probs[b][:, future & real_rows[b]] == 0)
        assert torch.all(probs[1, :, 3:, :3] == 0)  # real tokens never attend to padding
    assert model.config._attn_implementation == "sdpa"


# --- Jensen-Shannon similarity ------------------------------------------------------------------------


def test_js_of_identical_maps_is_zero() -> None:
    probs = random_maps(2, 4, 12)
    result = adjacent_layer_similarity([probs, probs.clone(), probs.clone()])
    assert result["layers"] == [1, 2]
    for key in ("same_head_js", "best_aligned_js"):
        assert result[key] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert result["aligned_head"] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert result["num_rows"] == 2 * 12


def test_js_of_head_permuted_copy() -> None:
    probs = random_maps(2, 4, 16)
    perm = [2, 0, 3, 1]
    result = adjacent_layer_similarity([probs, probs[:, perm]])  # layer 1 head i = layer 0 head perm[i]
    assert result["best_aligned_js"][0] == pytest.approx(0.0, abs=1e-6)
    assert result["best_aligned_js_per_head"][0] == pytest.approx([0.0] * 4, abs=1e-6)
    assert result["aligned_head"][0] == perm
    assert result["same_head_js"][0] > 0.05
    assert min(result["same_head_js_per_head"][0]) > 0.01


def test_js_values_match_the_definition() -> None:
    # disjoint one-hot rows give the maximum ln 2; the first row (one key) always gives 0
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    assert adjacent_layer_similarity([p, q])["same_head_js"][0] == pytest.approx(math.log(2) / 2, rel=1e-6)

    layer0, layer1 = random_maps(2, 3, 10, seed=1), random_maps(2, 3, 10, seed=2)
    pairwise = torch.tensor(adjacent_layer_similarity([layer0, layer1])["pairwise_js"][0])
    expected = torch.stack([
        torch.stack([reference_js(layer1[:, i], layer0[:, j]).mean() for j in range(3)]) for i in range(3)
    ])
    assert torch.allclose(pairwise, expected.float(), atol=1e-5)


def test_masked_rows_are_ignored() -> None:
    maps = [random_maps(2, 4, 10, seed=s) for s in range(3)]
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    poisoned = [m.clone() for m in maps]
    for m in poisoned:
        m[1, :, :3] = float("nan")  # whatever the model puts in padding rows must not matter
    result = adjacent_layer_similarity(poisoned, mask)
    assert result["num_rows"] == 17

    sums_a, rows_a = pairwise_js_sums([m[:1] for m in maps])
    sums_b, rows_b = pairwise_js_sums([m[1:, :, 3:] for m in maps])  # only the valid query rows
    expected = (sums_a + sums_b) / (rows_a + rows_b)
    assert torch.allclose(torch.tensor(result["pairwise_js"], dtype=torch.float64), expected, atol=1e-6)


def test_head_chunking_does_not_change_the_result() -> None:
    maps = [random_maps(2, 4, 8, seed=s) for s in range(3)]
    one = adjacent_layer_similarity(maps, head_chunk=1)
    three = adjacent_layer_similarity(maps, head_chunk=3)
    full = adjacent_layer_similarity(maps)
    for key in ("pairwise_js", "same_head_js", "best_aligned_js"):
        assert torch.allclose(torch.tensor(one[key]), torch.tensor(full[key]), atol=1e-6)
        assert torch.allclose(torch.tensor(three[key]), torch.tensor(full[key]), atol=1e-6)


# --- analyze: files and CLI ---------------------------------------------------------------------------


def test_analyze_writes_json_and_png(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = analyze(
        str(model_dir), texts=[str(text_file)], num_sequences=3, seq_len=16, out_dir=out, batch_size=2,
        progress=False,
    )
    saved = json.loads((out / "similarity.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["layers"] == [1, 2, 3] and saved["num_rows"] == 3 * 16
    assert len(saved["best_aligned_js_per_head"]) == 3 and len(saved["best_aligned_js_per_head"][0]) == 4
    assert all(b <= s + 1e-9 for b, s in zip(saved["best_aligned_js"], saved["same_head_js"]))
    assert "sensitivity" not in saved
    png = (out / "similarity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_analyze_sensitivity_only_when_computed(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    seen = {}

    def sensitivity_fn(model, input_ids, attention_mask):
        seen["shape"] = tuple(input_ids.shape)
        return [0.1 * layer for layer in range(model.config.num_hidden_layers)]

    result = analyze(
        str(model_dir), texts=[str(text_file)], num_sequences=2, seq_len=8, out_dir=tmp_path / "s",
        sensitivity_fn=sensitivity_fn, progress=False,
    )
    assert seen["shape"] == (2, 8)
    assert result["sensitivity"] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert json.loads((tmp_path / "s" / "similarity.json").read_text())["sensitivity"] == result["sensitivity"]
    with pytest.raises(ValueError, match="sensitivity_fn returned 2 values for 4 layers"):
        analyze(
            str(model_dir), texts=[str(text_file)], num_sequences=2, seq_len=8, out_dir=tmp_path / "bad",
            sensitivity_fn=lambda *args: [1.0, 2.0], progress=False,
        )


def test_cli_analyze(model_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    argv = ["analyze", str(model_dir), "--text", str(text_file), "--num-sequences", "2", "--seq-len", "8",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "same-head JS" in printed and str(out / "similarity.png") in printed
    assert (out / "similarity.json").is_file() and (out / "similarity.png").is_file()
    assert main(["analyze", str(model_dir), "--text", str(tmp_path / "missing.txt")]) == 1


# --- calibration text ---------------------------------------------------------------------------------


def test_load_texts_embedded_corpus_and_files(text_file: Path, tmp_path: Path) -> None:
    corpus = load_texts(None)
    assert len(corpus) > 50 and sum(map(len, corpus)) > 100_000
    assert load_texts([str(text_file)]) == [text_file.read_text()]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_texts([str(tmp_path / "missing.txt")])


def test_load_texts_hf_without_datasets_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install 'lisa-peft\[data\]'"):  # MissingExtraError
        load_texts(["hf:wikitext:wikitext-2-raw-v1:test"])
    with pytest.raises(ValueError, match="hf:NAME"):
        load_texts(["hf:"])


def test_chunk_token_windows() -> None:
    tokenizer = tiny_tokenizer()
    texts = [" ".join(WORDS), " ".join(reversed(WORDS))]
    stream = tokenizer(texts[0])["input_ids"] + [1] + tokenizer(texts[1])["input_ids"]
    windows = chunk_token_windows(tokenizer, texts, num_sequences=3, seq_len=7)
    assert windows.shape == (3, 7) and windows.dtype == torch.long
    assert len(stream) == 39  # -> 5 windows of 7; evenly spaced picks 0, 1, 3
    for row, index in zip(windows.tolist(), [0, 1, 3]):
        assert row == stream[index * 7:(index + 1) * 7]
    with pytest.raises(ValueError, match="39 tokens"):
        chunk_token_windows(tokenizer, texts, num_sequences=6, seq_len=7)


def test_cli_analyze_with_lisa_sensitivity(model_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sens"
    argv = ["analyze", str(model_dir), "--text", str(text_file), "--num-sequences", "2", "--seq-len", "8",
            "--out", str(out), "--sensitivity"]
    assert main(argv) == 0
    result = json.loads((out / "similarity.json").read_text())
    sensitivity = result["sensitivity"]
    assert len(sensitivity) == 4 and sensitivity[:2] == [None, None]  # min_full_layers = 2 stay full
    assert all(isinstance(v, float) for v in sensitivity[2:])
    assert result["sensitivity_unit"].startswith("LM-loss increase")
    assert "(full)" in capsys.readouterr().out


def test_analyze_without_matplotlib_names_the_extra_before_loading_anything(
    model_dir: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import sys

    import lisa_peft.pipeline.base_models

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(lisa_peft.pipeline.base_models, "load_base_model",
                        lambda *a, **k: pytest.fail("loaded the model although the figure cannot be drawn"))
    argv = ["analyze", str(model_dir), "--text", str(text_file), "--num-sequences", "2", "--seq-len", "8",
            "--out", str(tmp_path / "a")]
    assert main(argv) == 2
    assert "pip install 'lisa-peft[plot]'" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([*argv, "--no-plot"]) == 0  # the JSON alone needs no plot extra
    assert (tmp_path / "a" / "similarity.json").is_file() and not (tmp_path / "a" / "similarity.png").exists()
