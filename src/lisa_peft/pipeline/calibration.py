"""Calibration of LiSA layers on text through the frozen base model (docs/method.md, "Initialisation").

Everything here is teacher-forced: the hidden states entering each layer's attention are
captured once from the *base* model (`capture_attention_inputs`), so every layer can be
initialised, scored and fitted from the same tensors without running the whole model again.

* `activation_planes`: per KV head, the `r/2` rotary planes whose partial scores carry the most
  energy over the causal region of the calibration data.
* `fit_head_ffn`: least-squares map M (H x H) from the previous layer's logits to this layer's
  residual `S - delta`, realised exactly by `W1 = [M; -M]`, `W2 = [I, -I]`. Rows are centred
  over the valid keys first: softmax ignores per-row constants, so they are not worth fitting.
* `fit_layer`: the layer-wise stage: Adam on KL(base attention || LiSA attention).
* `layer_sensitivity`: attention KL of a calibrated-at-init LiSA layer, per candidate layer,
  used by `lisa_layers="auto"`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..tuners.lisa import functional as LF
from ..tuners.lisa import transformers_compat as compat
from ..tuners.lisa.layer import LisaAttention
from ..tuners.lisa.model import backbone


@dataclass
class AttentionInputs:
    """Teacher-forced inputs of every layer's attention.

    hidden: layer index -> [N, T, d] (input of `self_attn`, i.e. after input_layernorm);
    position_embeddings: (cos, sin), each [1, T, D].
    """

    hidden: dict[int, torch.Tensor]
    position_embeddings: tuple[torch.Tensor, torch.Tensor]

    @property
    def num_sequences(self) -> int:
        return next(iter(self.hidden.values())).shape[0]

    def rope(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) broadcast to a batch of n sequences."""
        return _batched(self.position_embeddings, n)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of a (PEFT-wrapped) LLaMA model."""
    return backbone(model).layers


def base_attention(layer: nn.Module) -> nn.Module:
    """The base LlamaAttention of a decoder layer (unwrapping a LisaAttention)."""
    attn = layer.self_attn
    return attn.get_base_layer() if isinstance(attn, LisaAttention) else attn


@torch.no_grad()
def capture_attention_inputs(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> AttentionInputs:
    """Run the base model on input_ids [N, T] (no padding) and keep each attention's input."""
    layers = decoder_layers(model)
    hidden: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    rope: list[tuple[torch.Tensor, torch.Tensor]] = []

    def make_hook(idx: int):
        def hook(module, args, kwargs):
            states = kwargs.get("hidden_states", args[0] if args else None)
            hidden[idx].append(states.detach())
            if idx == 0 and not rope:
                cos, sin = kwargs["position_embeddings"]
                rope.append((cos[:1].detach(), sin[:1].detach()))

        return hook

    handles = [
        layer.self_attn.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        batches = range(0, input_ids.shape[0], batch_size)
        for start in tqdm(batches, desc="calibration forward", disable=not progress, leave=False):
            model(input_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return AttentionInputs({i: torch.cat(v) for i, v in hidden.items()}, rope[0])


def full_qk(attn: nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
    """Rotary-embedded base queries [B, H, T, D] and keys [B, G, T, D] of a LLaMA attention."""
    b, t, _ = hidden.shape
    q = attn.q_proj(hidden).view(b, t, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hidden).view(b, t, -1, attn.head_dim).transpose(1, 2)
    return compat.apply_rotary_pos_emb(q, k, *rope)


@torch.no_grad()
def base_logits(attn: nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Pre-mask logits [B, H, T, T] of a base attention layer."""
    q, k = full_qk(attn, hidden, rope)
    return LF.grouped_scores(q.float(), k.float(), attn.scaling)


def causal_mask(t: int, device: torch.device) -> torch.Tensor:
    """Additive causal mask [1, 1, T, T] (float32)."""
    return LF.additive_mask(None, t, t, torch.float32, device)


@torch.no_grad()
def activation_planes(
    attn: nn.Module, inputs: AttentionInputs, layer_idx: int, num_planes: int, batch_size: int = 4
) -> torch.Tensor:
    """[G, num_planes] rotary planes per KV head with the largest partial-score energy (sorted)."""
    d = attn.head_dim
    half = d // 2
    num_kv = attn.config.num_key_value_heads
    group = attn.config.num_attention_heads // num_kv
    energy = torch.zeros(num_kv, half, dtype=torch.float64)
    hidden = inputs.hidden[layer_idx]
    t = hidden.shape[1]
    valid = torch.ones(t, t, dtype=torch.bool, device=hidden.device).tril()
    for start in range(0, hidden.shape[0], batch_size):
        chunk = hidden[start : start + batch_size]
        q, k = full_qk(attn, chunk, inputs.rope(chunk.shape[0]))
        q, k = q.float(), k.float()
        for plane in range(half):
            dims = [plane, plane + half]
            partial = LF.grouped_scores(q[..., dims], k[..., dims], attn.scaling)  # [B, H, T, T]
            per_head = partial.pow(2).masked_fill(~valid, 0).sum(dim=(0, 2, 3))  # [H]
            energy[:, plane] += per_head.view(num_kv, group).sum(1).double().cpu()
    return energy.topk(num_planes, dim=-1).indices.sort(dim=-1).values


def _centre_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over valid keys from every [.., i, :] row; zero invalid entries."""
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = x.masked_fill(~valid, 0).sum(-1, keepdim=True) / count
    return (x - mean).masked_fill(~valid, 0)


@torch.no_grad()
def fit_head_ffn(
    layer: LisaAttention,
    adapter: str,
    prev_logits: torch.Tensor,
    target_logits: torch.Tensor,
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    ridge: float = 1e-3,
    batch_size: int = 4,
) -> None:
    """Least-squares head alignment: FFN(prev) ~ target - delta (row-centred, causal region).

    prev_logits / target_logits: [N, H, T, T]; hidden [N, T, d]. Writes W1 = [M; -M],
    W2 = [I, -I] (zero-padded if ffn_hidden > 2H) so that the FFN computes exactly M x.
    In `share="probs"` mode the FFN reads probabilities and its target is the residual's
    exponential (normalised per row), fitted with a bias.
    """
    h = layer.num_heads
    share = layer.lisa_share[adapter]
    t = prev_logits.shape[-1]
    valid = torch.ones(t, t, dtype=torch.bool, device=prev_logits.device).tril()
    mask = causal_mask(t, prev_logits.device)
    features = h + (1 if share == "probs" else 0)
    xtx = torch.zeros(features, features, dtype=torch.float64)
    xty = torch.zeros(features, h, dtype=torch.float64)
    for start in range(0, prev_logits.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        q_r, k_r = layer.lisa_projections(adapter, hidden[sl], _batched(rope, hidden[sl].shape[0]))
        delta = LF.grouped_scores(q_r.float(), k_r.float(), layer.base_layer.scaling)
        residual = target_logits[sl].float() - delta
        if share == "logits":
            x = _centre_rows(prev_logits[sl].float(), valid)
            y = _centre_rows(residual, valid)
        else:
            x = LF.masked_softmax(prev_logits[sl].float(), mask, torch.float32)
            y = LF.masked_softmax(residual, mask, torch.float32)
        x = x.permute(0, 2, 3, 1)[valid.expand(x.shape[0], -1, -1)]  # [samples, H]
        y = y.permute(0, 2, 3, 1)[valid.expand(y.shape[0], -1, -1)]
        if share == "probs":
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        xtx += (x.T @ x).double().cpu()
        xty += (x.T @ y).double().cpu()
    scale = xtx.diagonal().mean().clamp(min=1e-12)
    solution = torch.linalg.solve(xtx + ridge * scale * torch.eye(features, dtype=torch.float64), xty)
    m = solution[:h].T.float()  # [H_out, H_in]
    bias = solution[h].float() if share == "probs" else torch.zeros(h)
    set_linear_ffn(layer, adapter, m, bias)


@torch.no_grad()
def set_linear_ffn(layer: LisaAttention, adapter: str, m: torch.Tensor, bias: torch.Tensor) -> None:
    """Make the FFN compute exactly `m @ x + bias` (m [H, H], bias [H]) via relu(z) - relu(-z).

    Units beyond the first 2H (ffn_hidden > 2H) get nn.Linear's random input weights and zero output
    weights: the function is unchanged, and they can still learn (all-zero units would get no gradient
    through ReLU and stay dead)."""
    up, down = layer.lisa_ffn_up[adapter], layer.lisa_ffn_down[adapter]
    h = layer.num_heads
    if up.out_features < 2 * h:
        raise ValueError(f"Calibrated init needs ffn_hidden >= 2 * num_heads = {2 * h}; got {up.out_features}.")
    eye = torch.eye(h)
    up.weight.zero_()
    up.bias.zero_()
    down.weight.zero_()
    up.weight[:h] = m.to(up.weight)
    up.weight[h : 2 * h] = -m.to(up.weight)
    down.weight[:, :h] = eye.to(down.weight)
    down.weight[:, h : 2 * h] = -eye.to(down.weight)
    down.bias.copy_(bias.to(down.bias))
    if up.out_features > 2 * h:
        nn.init.kaiming_uniform_(up.weight[2 * h :], a=math.sqrt(5))


def _batched(rope: tuple[torch.Tensor, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rope
    return cos.expand(n, -1, -1), sin.expand(n, -1, -1)


def attention_kl(target_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(softmax(target) || softmax(logits)) over (batch, head, query); logits [B, H, T, N]."""
    log_p = F.log_softmax(target_logits.float() + mask, dim=-1)
    log_q = F.log_softmax(logits.float() + mask, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def lisa_layer_logits(
    layer: LisaAttention,
    adapter: str,
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    prev_logits: torch.Tensor,
) -> torch.Tensor:
    """Teacher-forced LiSA logits [B, H, T, T] of one layer."""
    q_r, k_r = layer.lisa_projections(adapter, hidden, _batched(rope, hidden.shape[0]))
    mask = causal_mask(hidden.shape[1], hidden.device)
    return layer.lisa_logits(adapter, q_r, k_r, prev_logits, mask)


@torch.no_grad()
def evaluate_layer_kl(
    layer: LisaAttention,
    adapter: str,
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    prev_logits: torch.Tensor,
    target_logits: torch.Tensor,
    batch_size: int = 4,
) -> float:
    """Mean attention KL of a LiSA layer against the base layer over all calibration sequences."""
    mask = causal_mask(hidden.shape[1], hidden.device)
    total, count = 0.0, 0
    for start in range(0, hidden.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        logits = lisa_layer_logits(layer, adapter, hidden[sl], rope, prev_logits[sl])
        n = hidden[sl].shape[0]
        total += attention_kl(target_logits[sl], logits, mask).item() * n
        count += n
    return total / count


def fit_layer(
    layer: LisaAttention,
    adapter: str,
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    prev_logits: torch.Tensor,
    target_logits: torch.Tensor,
    steps: int,
    lr: float = 2e-3,
    batch_size: int = 4,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Layer-wise stage: Adam on attention KL for one LiSA layer (its own weights only).

    hidden [N, T, d], prev_logits / target_logits [N, H, T, T]. Returns the loss per step.
    """
    params = [p for name, p in layer.named_parameters() if name.startswith("lisa_") and f".{adapter}." in name]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    mask = causal_mask(hidden.shape[1], hidden.device)
    generator = torch.Generator().manual_seed(0)
    losses = []
    try:
        for step in range(steps):
            pick = torch.randint(0, hidden.shape[0], (min(batch_size, hidden.shape[0]),), generator=generator)
            pick = pick.to(hidden.device)
            logits = lisa_layer_logits(layer, adapter, hidden[pick], rope, prev_logits[pick])
            loss = attention_kl(target_logits[pick], logits, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step, losses[-1])
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
    return losses
