"""The compact LiSA model: `merge_and_unload()` -> `LisaLlamaForCausalLM`, exactly the PeftModel, save/load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import lisa_peft
from lisa_peft import LisaConfig, LisaLlamaConfig, LisaLlamaForCausalLM
from lisa_peft.compact.lisa_llama import CompactCheckpointError, LisaLlamaAnchorAttention, LisaLlamaAttention
from lisa_peft.compact.merge import compact_sizes, parameter_bytes
from lisa_peft.tuners.lisa.transformers_compat import cache_kwargs, output_cache
from tests.helpers.tiny_assets import char_tokenizer
from tests.helpers.tiny_models import tiny_llama

LAYERS = [2, 3, 5]


def _trained(kv_heads: int = 2, base: torch.nn.Module | None = None, seed: int = 0, **kwargs):
    """A LiSA PeftModel whose LiSA weights moved away from their (identity) init."""
    model = get_peft_model(base if base is not None else tiny_llama(kv_heads), LisaConfig(lisa_layers=LAYERS, **kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lisa_" in name:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)
    return model.eval()


@torch.no_grad()
def _logits(model, ids, **kwargs):
    return model(ids, **kwargs).logits


# ---------------------------------------------------------------------------------------------- structure
def test_merge_and_unload_returns_the_registered_compact_model(kv_heads):
    peft_model = _trained(kv_heads)
    base_q = peft_model.get_base_model().model.layers[0].self_attn.q_proj.weight
    compact = peft_model.merge_and_unload()
    assert type(compact) is LisaLlamaForCausalLM and compact.config.model_type == "lisa_llama"
    assert transformers.AutoConfig.for_model("lisa_llama").__class__ is LisaLlamaConfig
    assert transformers.AutoModelForCausalLM.from_config(compact.config).__class__ is LisaLlamaForCausalLM
    layers = compact.model.layers
    for idx in LAYERS:
        attn = layers[idx].self_attn
        assert isinstance(attn, LisaLlamaAttention)
        assert not hasattr(attn, "q_proj") and not hasattr(attn, "k_proj")
        names = {n.split(".")[0] for n, _ in attn.named_parameters()}
        assert names == {"lisa_q_proj", "lisa_k_proj", "lisa_ffn_up", "lisa_ffn_down", "v_proj", "o_proj"}
        assert attn.lisa_q_proj.weight.shape == (4 * 4, 64) and attn.lisa_k_proj.weight.shape == (kv_heads * 4, 64)
    assert isinstance(layers[1].self_attn, LisaLlamaAnchorAttention) and isinstance(layers[4].self_attn,
                                                                                     LisaLlamaAnchorAttention)
    assert type(layers[0].self_attn) is transformers.models.llama.modeling_llama.LlamaAttention
    assert layers[0].self_attn.q_proj.weight.data_ptr() == base_q.data_ptr()  # shared, not copied
    dropped = len(LAYERS) * (4 + kv_heads) * 16 * 64 * 4
    lisa = sum(p.numel() * 4 for n, p in peft_model.named_parameters() if "lisa_" in n)
    base_bytes = parameter_bytes(tiny_llama(kv_heads))
    assert parameter_bytes(compact) == base_bytes - dropped + lisa
    sizes = compact_sizes(compact)
    assert (sizes.base, sizes.compact, sizes.adapter_form) == (base_bytes, base_bytes - dropped + lisa,
                                                               base_bytes + lisa)
    assert sizes.qk_compression == 16 / 4


def test_unload_still_returns_the_base_model(input_ids):
    base = tiny_llama(2)
    reference = _logits(base, input_ids)
    model = _trained(base=base)
    model.merge_and_unload()  # leaves the PeftModel as it was
    unloaded = model.unload()
    assert unloaded is base and type(unloaded.model.layers[2].self_attn).__name__ == "LlamaAttention"
    assert torch.equal(_logits(unloaded, input_ids), reference)


def test_several_adapters_need_a_name(input_ids):
    model = _trained()
    model.add_adapter("other", LisaConfig(lisa_layers=[4, 5], init_lisa_weights="random"))
    with pytest.raises(ValueError, match=r"2 LiSA adapters \['default', 'other'\].*adapter_names=\['default'\]"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="exactly one LiSA adapter"):
        model.merge_and_unload(adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="No adapter named 'nope'"):
        model.merge_and_unload(adapter_names=["nope"])
    for name in ("default", "other"):
        model.set_adapter(name)
        compact = model.merge_and_unload(adapter_names=[name])
        assert compact.config.lisa_layers == model.peft_config[name].lisa_layers
        torch.testing.assert_close(_logits(compact, input_ids), _logits(model, input_ids), atol=1e-5, rtol=0)


def test_lisa_next_to_another_method_is_refused():
    lora_base = get_peft_model(tiny_llama(2), LoraConfig(target_modules=["gate_proj"], r=2)).base_model.model
    model = get_peft_model(lora_base, LisaConfig(lisa_layers=LAYERS))
    with pytest.raises(ValueError, match="another PEFT method.*LoRA|another PEFT method.*Linear"):
        model.merge_and_unload()


def test_safe_merge_refuses_nan_lisa_weights():
    model = _trained()
    with torch.no_grad():
        model.get_base_model().model.layers[3].self_attn.lisa_ffn_up["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_and_unload(safe_merge=True)


# ---------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("share", ["logits", "probs"])
def test_compact_logits_equal_the_peft_model(kv_heads, input_ids, share):
    model = _trained(kv_heads, share=share)
    compact = model.merge_and_unload()
    torch.testing.assert_close(_logits(compact, input_ids), _logits(model, input_ids), atol=1e-5, rtol=0)


def test_compact_generation_left_padding_and_chunked_prefill(kv_heads, input_ids):
    model = _trained(kv_heads)
    compact = model.merge_and_unload()
    batch = torch.tensor([[11, 12, 13, 14, 15, 16, 17], [0, 0, 0, 21, 22, 23, 24]])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        for kwargs in ({"input_ids": input_ids}, {"input_ids": batch, "attention_mask": mask}):
            expected = model.generate(**kwargs, max_new_tokens=8, do_sample=False)
            assert torch.equal(compact.generate(**kwargs, max_new_tokens=8, do_sample=False), expected)
        torch.testing.assert_close(_logits(compact, batch, attention_mask=mask),
                                   _logits(model, batch, attention_mask=mask), atol=1e-5, rtol=0)
        full = _logits(model, input_ids)
        out = compact(input_ids[:, :5], use_cache=True)  # prefill in chunks of 5, 4, 3 over the cache
        chunks, cache = [out.logits], output_cache(out)
        for start, stop in ((5, 9), (9, 12)):
            out = compact(input_ids[:, start:stop], use_cache=True, **cache_kwargs(cache))
            chunks.append(out.logits)
            cache = output_cache(out)
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-4)


def test_bfloat16_base_keeps_float32_lisa_weights(tmp_path, input_ids):
    tiny_llama(2).save_pretrained(tmp_path / "base")  # loaded in bf16 as users do (float32 RoPE buffers)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    model = _trained(base=base)  # PEFT rule: float32 LiSA weights on a bf16 base
    compact = model.merge_and_unload()
    assert compact.config.lisa_dtype == "float32"
    expected = _logits(model, input_ids)
    torch.testing.assert_close(_logits(compact, input_ids), expected)  # bf16 tolerance
    compact.save_pretrained(tmp_path / "compact")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    attn = loaded.model.layers[3].self_attn
    assert loaded.dtype == torch.bfloat16 and attn.v_proj.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in attn.named_parameters() if n.startswith("lisa_")} == {torch.float32}
    torch.testing.assert_close(_logits(loaded, input_ids), expected)


# ---------------------------------------------------------------------------------------------- save / load
def test_save_writes_a_standard_folder_and_auto_loads_it(tmp_path, kv_heads, input_ids):
    model = _trained(kv_heads, share="probs")
    expected = _logits(model, input_ids)
    compact = model.merge_and_unload()
    compact.save_pretrained(tmp_path, tokenizer=char_tokenizer())
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "lisa_llama" and config["architectures"] == ["LisaLlamaForCausalLM"]
    assert config["lisa_layers"] == LAYERS and config["lisa_r"] == 4 and config["lisa_share"] == "probs"
    assert config["num_key_value_heads"] == kv_heads and config["hidden_size"] == 64  # the base config
    keys = set(load_file(tmp_path / "model.safetensors"))
    for idx in LAYERS:
        assert f"model.layers.{idx}.self_attn.q_proj.weight" not in keys
        assert f"model.layers.{idx}.self_attn.k_proj.weight" not in keys
        assert f"model.layers.{idx}.self_attn.lisa_q_proj.weight" in keys
    assert "model.layers.1.self_attn.q_proj.weight" in keys
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is LisaLlamaForCausalLM
    torch.testing.assert_close(_logits(loaded, input_ids), expected, atol=1e-5, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).encode("ab") == char_tokenizer().encode("ab")


def test_fresh_process_loads_after_import_lisa_peft(tmp_path, input_ids):
    model = _trained()
    expected = _logits(model, input_ids)
    model.merge_and_unload().save_pretrained(tmp_path / "compact")
    torch.save(input_ids, tmp_path / "ids.pt")
    code = (
        "import torch, lisa_peft; from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'compact')!r});"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r});"
        f"torch.save(m(ids).logits.detach(), {str(tmp_path / 'out.pt')!r})"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-5, rtol=0)


@pytest.fixture
def saved_compact(tmp_path):
    folder = tmp_path / "compact"
    _trained().merge_and_unload().save_pretrained(folder)
    return folder


def _edit_weights(folder, edit) -> None:
    path = folder / "model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("model.layers.3.self_attn.lisa_ffn_up.weight"), "missing tensors.*lisa_ffn_up"),
        (lambda t: t.__setitem__("model.layers.3.self_attn.q_proj.weight", torch.zeros(64, 64)),
         "unexpected tensors.*layers.3.self_attn.q_proj"),
        (lambda t: t["model.layers.2.self_attn.lisa_k_proj.weight"].fill_(float("nan")), "NaN/inf.*lisa_k_proj"),
        (lambda t: t.__setitem__("model.layers.2.self_attn.lisa_q_proj.weight", torch.zeros(8, 64)),
         r"shape mismatches model.layers.2.self_attn.lisa_q_proj.weight \(8, 64\) \(saved\) vs \(16, 64\)"),
    ],
    ids=["missing", "extra", "nan", "shape"],
)
def test_loading_refuses_bad_checkpoints(saved_compact, edit, message):
    _edit_weights(saved_compact, edit)
    with pytest.raises(CompactCheckpointError, match=message):
        transformers.AutoModelForCausalLM.from_pretrained(saved_compact)


def test_loading_refuses_a_bad_config(saved_compact):
    path = saved_compact / "config.json"
    config = json.loads(path.read_text())
    config["lisa_rotary_planes"]["3"] = [[0]]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lisa_rotary_planes\\['3'\\] must be"):
        transformers.AutoModelForCausalLM.from_pretrained(saved_compact)
    with pytest.raises(CompactCheckpointError, match="ignore_mismatched_sizes"):
        LisaLlamaForCausalLM.from_pretrained(saved_compact, ignore_mismatched_sizes=True)


# ---------------------------------------------------------------------------------------------- tools
def test_pipeline_text_generation_with_the_compact_folder(tmp_path):
    tokenizer = char_tokenizer()
    base = tiny_llama(2, vocab_size=len(tokenizer), pad_token_id=2, bos_token_id=1, eos_token_id=2)
    model = _trained(base=base)
    model.merge_and_unload().save_pretrained(tmp_path, tokenizer=tokenizer)
    generator = transformers.pipeline("text-generation", model=str(tmp_path), device="cpu")
    out = generator("the quick", max_new_tokens=6, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    ids = tokenizer("the quick", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert list(out) == expected[0].tolist() and len(out) == ids.shape[1] + 6
    assert generator("the quick", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("the quick")


def test_lm_eval_model_class_loads_the_compact_folder(tmp_path):
    pytest.importorskip("lm_eval")
    from lisa_peft.evaluation.lm_eval_model import HFLisaLM

    tokenizer = char_tokenizer()
    base = tiny_llama(2, vocab_size=len(tokenizer), pad_token_id=2, bos_token_id=1, eos_token_id=2)
    model = _trained(base=base)
    model.merge_and_unload().save_pretrained(tmp_path, tokenizer=tokenizer)
    lm = HFLisaLM(pretrained=str(tmp_path), device="cpu", batch_size=1)
    assert type(lm.model) is LisaLlamaForCausalLM and lm.lisa_layers == LAYERS
    assert lm.get_model_info()["lisa_layers"] == LAYERS
    context, continuation = lm.tok_encode("the quick"), lm.tok_encode(" brown")
    ((loglik, _),) = lm._loglikelihood_tokens([(("the quick", " brown"), context, continuation)])
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    target = ids[0, 1:]
    expected = logp[torch.arange(len(target)), target][-len(continuation):].sum().item()
    assert loglik == pytest.approx(expected, abs=1e-4)


def test_lisa_peft_exports_the_compact_classes():
    assert lisa_peft.LisaLlamaForCausalLM is LisaLlamaForCausalLM and lisa_peft.LisaLlamaConfig is LisaLlamaConfig


# ---------------------------------------------------------------------------------------------- kernels
@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the kernels on CPU tensors under TRITON_INTERPRET=1")
def test_compact_model_keeps_the_kernel_dispatch(monkeypatch, input_ids):
    """kernel="triton" carries over: the compact model calls the same kernels as the PeftModel, same numbers."""
    import lisa_kernels

    calls: dict[str, int] = {}
    for name in ("anchor_attention", "lisa_prefill", "lisa_decode"):
        original = getattr(lisa_kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(lisa_kernels, name, counted)
    model = _trained(kernel="triton")
    compact = model.merge_and_unload()
    assert compact.config.lisa_kernel == "triton"
    expected = _logits(model, input_ids)
    peft_calls = dict(calls)
    calls.clear()
    torch.testing.assert_close(_logits(compact, input_ids), expected, atol=1e-5, rtol=1e-4)
    assert calls == peft_calls == {"anchor_attention": 2, "lisa_prefill": 3}
    with torch.no_grad():
        tokens = compact.generate(input_ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(tokens, model.generate(input_ids, max_new_tokens=3, do_sample=False))
    assert calls["lisa_decode"] > 0


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_compact_model_is_smaller_and_equal(tmp_path):
    """SmolLM2-135M, 12 of 30 layers LiSA: compact logits == PeftModel's; the saved folder is smaller."""
    from lisa_peft.pipeline.base_models import load_base_model

    base, tokenizer = load_base_model()
    base_bytes = parameter_bytes(base)
    model = get_peft_model(base, LisaConfig(lisa_layers=list(range(18, 30)))).eval()
    ids = tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt").input_ids
    expected = _logits(model, ids)
    compact = model.merge_and_unload()
    torch.testing.assert_close(_logits(compact, ids), expected, atol=1e-5, rtol=0)
    sizes = compact_sizes(compact)
    assert sizes.base == base_bytes and sizes.compact < base_bytes and sizes.r == 12
    compact.save_pretrained(tmp_path, tokenizer=tokenizer)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.equal(loaded.generate(ids, max_new_tokens=8, do_sample=False),
                           model.generate(ids, max_new_tokens=8, do_sample=False))
