"""LiSA layers with r < head_dim against an independent reference built from the base layers.

The reference never uses lisa-peft's own RoPE or plane-selection code: it rotates the *full* base
queries and keys (base Wq/Wk, the model's cos/sin, a local rotate-half), then keeps, for query head
h, the dimensions of the planes chosen for KV group h // g. Right after initialisation a LiSA
layer's low-rank score must equal that partial score, and each layer of a run must chain
`S_l = FFN_l(S_{l-1}) + delta_l` (logits) or `log(relu(FFN_l(P_{l-1})) + eps) + delta_l` (probs).

The planes differ per KV group and are not the first r/2 ones, so mapping query heads to another
group's planes, or taking the RoPE frequencies of planes 0..r/2-1, fails these tests.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from lisa_peft import LisaConfig
from tests.helpers.tiny_models import tiny_llama

HEAD_DIM, R = 16, 4  # two of eight rotary planes per KV group
LISA_LAYERS = [2, 3, 4, 6]  # runs 2-3-4 (anchor 1) and 6 (anchor 5)
EPS = 1e-6  # functional.PROBS_EPS, restated on purpose
# Planes per KV group (up to 4 groups), distinct across groups and never planes 0..1.
PLANES = {2: [[2, 6], [3, 7], [4, 6], [5, 2]], 3: [[5, 7], [1, 4], [6, 3], [2, 7]],
          4: [[3, 4], [6, 7], [2, 5], [4, 7]], 6: [[7, 2], [4, 5], [3, 6], [1, 6]]}


def _model(kv_heads: int, share: str):
    planes = {str(layer): sorted_groups(groups[:kv_heads]) for layer, groups in PLANES.items()}
    config = LisaConfig(lisa_layers=LISA_LAYERS, r=R, share=share, init_lisa_weights="random", kernel="torch",
                        rotary_planes=planes)
    model = get_peft_model(tiny_llama(kv_heads, num_layers=7, attn_implementation="eager"), config).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a non-trivial head FFN in every LiSA layer
        for name, param in model.named_parameters():
            if "lisa_ffn" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
                if "lisa_ffn_down" in name and name.endswith("bias") and share == "probs":
                    param.add_(1.0)  # most of relu(A) > 0, so log(relu(A) + eps) carries information
    return model


def sorted_groups(groups: list[list[int]]) -> list[list[int]]:
    return [sorted(g) for g in groups]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotated_qk(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Full RoPE'd base queries [B, H, T, D] and keys [B, G, T, D] of a (base) attention module."""
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, -1, HEAD_DIM).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, HEAD_DIM).transpose(1, 2)
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _score(q: torch.Tensor, k: torch.Tensor, planes: list[list[int]] | None, scale: float) -> torch.Tensor:
    """[B, H, T, T] score of query head h against KV head h // g, on all dims or the group's planes only."""
    heads, groups = q.shape[1], k.shape[1]
    rows = []
    for h in range(heads):
        group = h // (heads // groups)
        dims = list(range(HEAD_DIM)) if planes is None else planes[group] + [p + HEAD_DIM // 2 for p in planes[group]]
        rows.append(q[:, h, :, dims] @ k[:, group, :, dims].transpose(-1, -2))
    return torch.stack(rows, dim=1) * scale


def _ffn(attn, x: torch.Tensor) -> torch.Tensor:
    """The head FFN of `attn` per (query, key) pair, written as two matmuls over the head axis."""
    up, down = attn.lisa_ffn_up["default"], attn.lisa_ffn_down["default"]
    pairs = x.permute(0, 2, 3, 1)  # [B, T, N, H]
    hidden = torch.relu(pairs @ up.weight.T + up.bias)
    return (hidden @ down.weight.T + down.bias).permute(0, 3, 1, 2)


def _reference_attention(model, ids: torch.Tensor, share: str) -> dict[int, torch.Tensor]:
    """Probabilities [B, H, T, T] of every LiSA layer, from the model's own hidden states per layer."""
    llama = model.get_base_model().model
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # hidden[l] = input of layer l
        positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        cos, sin = llama.rotary_emb(hidden[0], positions)
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        logits: dict[int, torch.Tensor] = {}
        probs: dict[int, torch.Tensor] = {}
        for layer in range(len(llama.layers)):
            wrapper = llama.layers[layer].self_attn
            attn = getattr(wrapper, "base_layer", wrapper)
            x = llama.layers[layer].input_layernorm(hidden[layer])
            q, k = _rotated_qk(attn, x, cos, sin)
            if layer in LISA_LAYERS:
                delta = _score(q, k, sorted_groups(PLANES[layer][: k.shape[1]]), attn.scaling)
                prev = logits[layer - 1] if share == "logits" else probs[layer - 1]
                aligned = _ffn(wrapper, prev)
                logits[layer] = aligned + delta if share == "logits" else torch.log(aligned.clamp(min=0) + EPS) + delta
            else:
                logits[layer] = _score(q, k, None, attn.scaling)
            probs[layer] = logits[layer].masked_fill(~causal, float("-inf")).softmax(-1)
    return {layer: probs[layer] for layer in LISA_LAYERS}


@pytest.mark.parametrize("share", ["logits", "probs"])
def test_lisa_chain_with_partial_rope_matches_independent_reference(kv_heads, input_ids, share):
    model = _model(kv_heads, share)
    assert model.peft_config["default"].rotary_planes["2"] == sorted_groups(PLANES[2][:kv_heads])
    expected = _reference_attention(model, input_ids, share)
    with torch.no_grad():
        attentions = model(input_ids, output_attentions=True).attentions
    for layer in LISA_LAYERS:
        torch.testing.assert_close(attentions[layer], expected[layer], atol=2e-5, rtol=1e-4, msg=f"layer {layer}")

