"""`LisaAttention`: the tuner layer that wraps a LLaMA `self_attn` module.

One wrapper per wrapped `self_attn`; for each adapter name it has a *role*:

* `"lisa"`: the layer's attention scores are replaced (spec "LiSA layer"). It owns that
  adapter's weights: `lisa_ffn_up` / `lisa_ffn_down` (head alignment FFN, W1/b1 and W2/b2),
  `lisa_q_proj` / `lisa_k_proj` (low-rank Q/K on the kept rotary planes) and the
  non-trainable plane index `lisa_rotary`.
* `"anchor"`: a full attention layer right before a run of LiSA layers. It computes attention
  explicitly so that it can hand its pre-mask logits on (spec "Full (anchor) layer").

With adapters disabled, or when the active adapter gives the layer no role, the wrapped module
runs unchanged (bit-exact base model).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ... import transformers_compat as compat
from . import functional as LF
from .dispatch import anchor_kernel, kernel_plan, lisa_kernel
from .state import LisaForwardState

ROLE_LISA = "lisa"
ROLE_ANCHOR = "anchor"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LisaRotaryIndex(nn.Module):
    """Kept rotary planes of one LiSA layer: `index` [G, r] = [planes, planes + D/2] per KV head."""

    def __init__(self, planes: torch.Tensor, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("index", torch.cat([planes, planes + head_dim // 2], dim=-1), persistent=False)

    @property
    def planes(self) -> torch.Tensor:
        """[G, r/2] plane indices (each in [0, D/2))."""
        return self.index[:, : self.index.shape[1] // 2]


class LisaAttention(nn.Module, BaseTunerLayer):
    """PEFT tuner layer around a LLaMA attention module (see module docstring)."""

    adapter_layer_names = ("lisa_q_proj", "lisa_k_proj", "lisa_ffn_up", "lisa_ffn_down")
    other_param_names = ("lisa_rotary", "lisa_roles", "lisa_share", "lisa_kernel", "lisa_prefill_chunk")

    def __init__(self, base_layer: nn.Module, layer_idx: int, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_idx = layer_idx
        config = base_layer.config
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads
        self.head_dim: int = base_layer.head_dim
        self.lisa_ffn_up = nn.ModuleDict()
        self.lisa_ffn_down = nn.ModuleDict()
        self.lisa_q_proj = nn.ModuleDict()
        self.lisa_k_proj = nn.ModuleDict()
        self.lisa_rotary = nn.ModuleDict()
        self.lisa_roles: dict[str, str] = {}
        self.lisa_share: dict[str, str] = {}
        self.lisa_kernel: dict[str, str] = {}  # LisaConfig.kernel per adapter (dispatch.py)
        self.lisa_prefill_chunk: dict[str, int | None] = {}  # LisaConfig.prefill_chunk_size per adapter (chunked.py)
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

    # ------------------------------------------------------------------ adapter management
    def update_layer(
        self, adapter_name: str, role: str, config: Any, planes: torch.Tensor | None = None
    ) -> None:
        """Give this layer `role` for `adapter_name`; for "lisa", create and initialise weights.

        planes: [G, r/2] rotary plane indices to keep (required for the "lisa" role).
        """
        self.lisa_roles[adapter_name] = role
        self.lisa_share[adapter_name] = config.share
        self.lisa_kernel[adapter_name] = config.kernel
        self.lisa_prefill_chunk[adapter_name] = getattr(config, "prefill_chunk_size", None)
        if role == ROLE_LISA:
            if planes is None:
                raise ValueError("A LiSA layer needs its rotary planes.")
            self._create_lisa_weights(adapter_name, config, planes)
        self.set_adapter(self.active_adapters)

    def _create_lisa_weights(self, adapter_name: str, config: Any, planes: torch.Tensor) -> None:
        base = self.base_layer
        weight = base.q_proj.weight
        dtype = _DTYPES[config.lisa_dtype] if config.lisa_dtype else weight.dtype
        device = weight.device if weight.device.type != "meta" else None
        r, hidden = config.r, config.ffn_hidden
        bias = base.q_proj.bias is not None
        self.lisa_rotary[adapter_name] = LisaRotaryIndex(planes.to(torch.long), self.head_dim).to(weight.device)
        self.lisa_q_proj[adapter_name] = nn.Linear(
            weight.shape[1], self.num_heads * r, bias=bias, dtype=dtype, device=device
        )
        self.lisa_k_proj[adapter_name] = nn.Linear(
            weight.shape[1], self.num_kv_heads * r, bias=bias, dtype=dtype, device=device
        )
        self.lisa_ffn_up[adapter_name] = nn.Linear(self.num_heads, hidden, dtype=dtype, device=device)
        self.lisa_ffn_down[adapter_name] = nn.Linear(hidden, self.num_heads, dtype=dtype, device=device)
        if weight.device.type != "meta":
            self.reset_lisa_parameters(adapter_name, config.init_lisa_weights)

    @torch.no_grad()
    def reset_lisa_parameters(self, adapter_name: str, init: str) -> None:
        """Initialise one adapter's weights: Q/K rows copied from the kept rotary planes of the base
        Wq/Wk (so delta starts as the base layer's partial score on those planes), FFN = identity
        ("identity") or small random with zero output weights ("random")."""
        self.copy_rotary_rows(adapter_name)
        up, down = self.lisa_ffn_up[adapter_name], self.lisa_ffn_down[adapter_name]
        h, f = self.num_heads, up.out_features
        if init in ("identity", "calibrate"):  # "calibrate": lisa_peft.convert fits the FFN afterwards
            if f < 2 * h:
                raise ValueError(
                    f"init_lisa_weights='identity' needs ffn_hidden >= 2 * num_heads = {2 * h} to represent the "
                    f"identity exactly (relu(x) - relu(-x)); got ffn_hidden={f}."
                )
            eye = torch.eye(h, dtype=up.weight.dtype, device=up.weight.device)
            up.weight.zero_()
            up.weight[:h] = eye
            up.weight[h : 2 * h] = -eye
            down.weight.zero_()
            down.weight[:, :h] = eye
            down.weight[:, h : 2 * h] = -eye
            up.bias.zero_()
            down.bias.zero_()
        elif init == "random":
            nn.init.normal_(up.weight, std=1.0 / math.sqrt(h))
            up.bias.zero_()
            down.weight.zero_()
            down.bias.zero_()
        else:
            raise ValueError(f"Unknown init_lisa_weights {init!r}; expected 'calibrate', 'identity' or 'random'.")

    @torch.no_grad()
    def copy_rotary_rows(self, adapter_name: str) -> None:
        """Set lisa_q_proj/lisa_k_proj to the base Wq/Wk rows of the kept rotary planes."""
        base = self.base_layer
        index = self.lisa_rotary[adapter_name].index  # [G, r]
        g = self.num_heads // self.num_kv_heads
        d = self.head_dim
        q_rows = (index.repeat_interleave(g, dim=0) + d * torch.arange(self.num_heads, device=index.device)[:, None])
        k_rows = index + d * torch.arange(self.num_kv_heads, device=index.device)[:, None]
        for proj, base_proj, rows in (
            (self.lisa_q_proj[adapter_name], base.q_proj, q_rows.reshape(-1)),
            (self.lisa_k_proj[adapter_name], base.k_proj, k_rows.reshape(-1)),
        ):
            proj.weight.copy_(base_proj.weight[rows])
            if proj.bias is not None:
                proj.bias.copy_(base_proj.bias[rows])

    def _active_role(self) -> tuple[str | None, str | None]:
        """(adapter name, role) that this forward uses, or (None, None) for the base path."""
        if self.disable_adapters:
            return None, None
        active = self.active_adapters
        if len(active) > 1:
            raise ValueError(
                f"LiSA replaces attention, so only one LiSA adapter can be active at a time; active: {active}. "
                "Call model.set_adapter(name) with a single name."
            )
        if not active or active[0] not in self.lisa_roles:
            return None, None
        return active[0], self.lisa_roles[active[0]]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(_MERGE_ERROR)

    def unmerge(self) -> None:
        raise ValueError(_MERGE_ERROR)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [B, T, d] -> (attention output [B, T, d], probabilities [B, H, T, N] or None).

        The KV cache arrives in `kwargs` under the name this transformers uses (`compat.CACHE_KWARG`).
        """
        state: LisaForwardState | None = kwargs.pop("lisa_state", None)
        adapter, role = self._active_role()
        if role is None:
            return self.base_layer(
                hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
            )
        if state is None:
            raise RuntimeError(
                "LiSA attention was called without its forward state. Run the whole model (the PeftModel returned "
                "by get_peft_model / PeftModel.from_pretrained), not a single decoder layer."
            )
        cache = compat.pop_cache(kwargs)
        if cache is None and kwargs.get("use_cache"):
            raise RuntimeError(
                f"Layer {self.layer_idx} was called with use_cache=True but received no KV cache (looked for "
                f"`{compat.CACHE_KWARG}`): this transformers release ({compat.TRANSFORMERS_VERSION}) passes the cache "
                "in a way lisa-peft does not know, and continuing would silently decode without it. Install a tested "
                f"release: pip install 'transformers>={compat.TESTED_TRANSFORMERS_MIN},"
                f"<={compat.TESTED_TRANSFORMERS_MAX}'."
            )
        run = self._anchor_forward if role == ROLE_ANCHOR else self._lisa_forward
        result = run(adapter, hidden_states, position_embeddings, attention_mask, cache, state)
        return self._call_base_forward_hooks(hidden_states, result)

    def _call_base_forward_hooks(self, hidden_states: torch.Tensor, result: tuple) -> tuple:
        """Run the forward hooks registered on the wrapped attention module with LiSA's output.

        Tools hook the base attention class (transformers records `output_attentions` that way);
        the base module's forward does not run on the LiSA path, so its hooks are called here as if
        it had produced `result`. A hook may replace the result, as with nn.Module hooks.
        """
        base = self.base_layer
        for hook_id, hook in list(base._forward_hooks.items()):
            if hook_id in base._forward_hooks_with_kwargs:
                out = hook(base, (hidden_states,), {}, result)
            else:
                out = hook(base, (hidden_states,), result)
            if out is not None:
                result = out
        return result

    def _project(self, proj: nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, T, d] -> [B, heads, T, e]."""
        out = proj(x.to(proj.weight.dtype))
        return out.view(*x.shape[:2], heads, -1).transpose(1, 2)

    def _anchor_forward(self, adapter, hidden_states, position_embeddings, attention_mask, cache, state):
        """Full attention that publishes its pre-mask logits; on the Triton kernel when dispatch.py says so
        (then the returned attention probabilities are None, as with sdpa)."""
        base = self.base_layer
        q = self._project(base.q_proj, hidden_states, self.num_heads)
        k = self._project(base.k_proj, hidden_states, self.num_kv_heads)
        v = self._project(base.v_proj, hidden_states, self.num_kv_heads)
        cos, sin = position_embeddings
        q, k = compat.apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = compat.update_cache(cache, k, v, self.layer_idx)
        plan = kernel_plan(self.lisa_kernel[adapter], attention_mask, (q, k, v), q.shape[2], k.shape[2], state)
        if plan is not None:
            out, logits = anchor_kernel(q, k, v, base.scaling, plan)
            probs = None
        else:
            logits = LF.grouped_scores(q, k, base.scaling)
            mask = LF.additive_mask(attention_mask, q.shape[2], k.shape[2], logits.dtype, logits.device)
            probs = LF.masked_softmax(logits, mask, v.dtype)
            out = LF.grouped_values(probs, v)
        out = state.publish(self.layer_idx, logits, out)
        return self._output(out), probs

    def lisa_projections(
        self, adapter: str, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary-embedded low-rank queries [B, H, T, r] and keys [B, G, T, r] of `adapter`."""
        q_r = self._project(self.lisa_q_proj[adapter], hidden_states, self.num_heads)
        k_r = self._project(self.lisa_k_proj[adapter], hidden_states, self.num_kv_heads)
        cos_r, sin_r = select_rotary_for(position_embeddings, self.lisa_rotary[adapter].index, q_r.dtype)
        g = self.num_heads // self.num_kv_heads
        q_r = LF.apply_rotary(q_r, cos_r.repeat_interleave(g, dim=1), sin_r.repeat_interleave(g, dim=1))
        return q_r, LF.apply_rotary(k_r, cos_r, sin_r)

    def lisa_logits(
        self, adapter: str, q_r: torch.Tensor, k_r: torch.Tensor, prev_logits: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """This layer's pre-mask logits [B, H, T, N] from the previous layer's [B, H, T, N]."""
        prev = prev_logits.to(q_r.dtype)
        delta = LF.grouped_scores(q_r, k_r, self.base_layer.scaling)
        share = self.lisa_share[adapter]
        ffn_in = prev if share == "logits" else LF.masked_softmax(prev, mask, q_r.dtype)
        return LF.combine_scores(self.head_ffn(adapter, ffn_in), delta, share)

    def _lisa_forward(self, adapter, hidden_states, position_embeddings, attention_mask, cache, state):
        """LiSA attention; on the Triton kernels when dispatch.py says so (then the probabilities are None)."""
        q_r, k_r = self.lisa_projections(adapter, hidden_states, position_embeddings)
        v = self._project(self.base_layer.v_proj, hidden_states, self.num_kv_heads)
        # The low-rank keys are stored at the base model's precision (V's dtype), whatever lisa_dtype is,
        # and used at that precision with or without a cache, so cached decoding equals a full forward.
        k_r = k_r.to(v.dtype)
        if cache is not None:
            k_r, v = compat.update_cache(cache, k_r, v, self.layer_idx)
        k_r = k_r.to(q_r.dtype)
        prev = state.consume(self.layer_idx - 1)
        up, down = self.lisa_ffn_up[adapter], self.lisa_ffn_down[adapter]
        plan = kernel_plan(
            self.lisa_kernel[adapter], attention_mask, (prev, q_r, k_r, v, up.weight, up.bias, down.weight, down.bias),
            q_r.shape[2], k_r.shape[2], state,
        )
        if plan is not None:
            out, logits = lisa_kernel(prev, q_r, k_r, v, up, down, self.base_layer.scaling, self.lisa_share[adapter],
                                      plan)
            return self._output(state.publish(self.layer_idx, logits, out)), None
        mask = LF.additive_mask(attention_mask, q_r.shape[2], k_r.shape[2], q_r.dtype, q_r.device)
        logits = self.lisa_logits(adapter, q_r, k_r, prev, mask)
        probs = LF.masked_softmax(logits, mask, v.dtype)
        out = state.publish(self.layer_idx, logits, LF.grouped_values(probs, v))
        return self._output(out), probs

    def head_ffn(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """The head-alignment FFN of `adapter` on [B, H, T, N] logits or probabilities."""
        up, down = self.lisa_ffn_up[adapter], self.lisa_ffn_down[adapter]
        return LF.head_ffn(x, up.weight, up.bias, down.weight, down.bias)

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> o_proj -> [B, T, d]."""
        b, h, t, d = out.shape
        out = out.transpose(1, 2).reshape(b, t, h * d)
        return self.base_layer.o_proj(out.to(self.base_layer.o_proj.weight.dtype))

    def __repr__(self) -> str:
        return "lisa." + super().__repr__()


def select_rotary_for(
    position_embeddings: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the kept planes, [B, G, T, r], in `dtype`."""
    cos_r, sin_r = LF.select_rotary(position_embeddings, index)
    return cos_r.to(dtype), sin_r.to(dtype)


_MERGE_ERROR = (
    "LiSA adapters cannot be merged into the base weights: a LiSA layer computes its attention scores from the "
    "previous layer's logits (head-alignment FFN) plus a low-rank rotary score, which is a different computation "
    "graph, not a weight delta. Keep the PeftModel (or save the adapter and load it with PeftModel.from_pretrained); "
    "use unload() to get the original base model back."
)
