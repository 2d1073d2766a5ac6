"""Block-wise output reconstruction for LiSA layers (an ablation of `benchmarks/fidelity.py`, not a default).

Layer by layer, the calibration windows run through the LiSA model and the base model side by side. At a
LiSA layer, Adam fits that layer's LiSA weights so that its whole decoder block (LiSA attention, residual,
MLP), fed the LiSA model's own hidden states (earlier errors included) and the previous layer's LiSA-model
logits, reproduces the base model's block output (mean squared error over all positions but the first).
As BRECQ / OmniQuant do for quantisation. Measured in docs/fidelity.md ("Conversion stages"): it helps less
per CPU-minute than end-to-end distillation, so the recipes do not use it.
"""

from __future__ import annotations

import torch

from lisa_peft.pipeline import calibration as C
from lisa_peft.tuners.lisa import attention as LA
from lisa_peft.tuners.lisa import functional as LF
from lisa_peft.tuners.lisa.layer import ROLE_LISA, LisaAttention
from lisa_peft.tuners.lisa.model import backbone


def _base_attention(attn, x, rope, mask):
    """(output [B, T, d], logits [B, H, T, T]) of a base attention layer."""
    q, k = C.full_qk(attn, x, rope)
    v = LA.project(attn.v_proj, x, attn.config.num_key_value_heads)
    logits = LF.grouped_scores(q.float(), k.float(), attn.scaling)
    probs = LF.masked_softmax(logits, mask, v.dtype)
    return LA.attention_output(attn.o_proj, LF.grouped_values(probs, v)), logits


def _lisa_attention(layer: LisaAttention, adapter, x, rope, prev, mask):
    """(output, logits) of a LiSA layer given the previous layer's logits [B, H, T, T]."""
    w = layer.lisa_weights(adapter)
    q_r, k_r = LA.lisa_projections(w, x, rope)
    v = LA.project(w.v_proj, x, w.num_kv_heads)
    logits = LA.lisa_logits(w, q_r, k_r, prev, mask)
    probs = LF.masked_softmax(logits, mask, v.dtype)
    return LA.attention_output(w.o_proj, LF.grouped_values(probs, v)), logits


def _block(decoder_layer, attention, h):
    """A LLaMA decoder block around `attention(normed h) -> (out, logits)`: (h_out [B, T, d], logits)."""
    out, logits = attention(decoder_layer.input_layernorm(h))
    h = h + out
    return h + decoder_layer.mlp(decoder_layer.post_attention_layernorm(h)), logits


def blockwise_stage(peft_model, adapter: str, input_ids: torch.Tensor, steps: int = 100, lr: float = 1e-3,
                    batch_size: int = 4) -> dict[int, tuple[float, float]]:
    """Fit every LiSA layer of `adapter` in order on input_ids [N, T]; {layer: (mse before, mse after)}."""
    layers = C.decoder_layers(peft_model)
    model = backbone(peft_model)
    n, t = input_ids.shape
    mask = C.causal_mask(t, input_ids.device)
    with torch.no_grad():
        h = model.embed_tokens(input_ids).float()
        cos, sin = model.rotary_emb(h, torch.arange(t)[None])

    def rope(m: int):
        return cos.expand(m, -1, -1), sin.expand(m, -1, -1)

    def base_block(idx: int, x: torch.Tensor):
        attn = C.base_attention(layers[idx])
        return _block(layers[idx], lambda y: _base_attention(attn, y, rope(y.shape[0]), mask), x)

    lisa = {i for i, layer in enumerate(layers)
            if isinstance(layer.self_attn, LisaAttention) and layer.self_attn.lisa_roles.get(adapter) == ROLE_LISA}
    h_base, h_lisa, prev = h.clone(), h.clone(), None
    generator = torch.Generator().manual_seed(0)
    record: dict[int, tuple[float, float]] = {}
    batches = [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    for idx, decoder_layer in enumerate(layers):
        with torch.no_grad():
            target = torch.cat([base_block(idx, h_base[b])[0] for b in batches])

        def lisa_block(b, idx=idx, prev=prev, h_lisa=h_lisa):
            attn = layers[idx].self_attn
            return _block(layers[idx], lambda y: _lisa_attention(attn, adapter, y, rope(y.shape[0]), prev[b], mask),
                          h_lisa[b])

        if idx in lisa:
            def loss_on(b, target=target):
                return (lisa_block(b)[0] - target[b])[:, 1:].pow(2).mean()

            params = [p for name, p in decoder_layer.self_attn.named_parameters()
                      if name.startswith("lisa_") and f".{adapter}." in name]
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.Adam(params, lr=lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
            with torch.no_grad():
                before = sum(loss_on(b).item() for b in batches) / len(batches)
            for _ in range(steps):
                loss = loss_on(torch.randint(0, n, (min(batch_size, n),), generator=generator))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            with torch.no_grad():
                record[idx] = (before, sum(loss_on(b).item() for b in batches) / len(batches))
        with torch.no_grad():
            outputs = [lisa_block(b) if idx in lisa else base_block(idx, h_lisa[b]) for b in batches]
            h_lisa = torch.cat([o[0] for o in outputs])
            prev = torch.cat([o[1] for o in outputs]) if idx + 1 in lisa else None
            h_base = target
    return record
