"""`LisaAttention`: the tuner layer that wraps a LLaMA `self_attn` module.

One wrapper per wrapped `self_attn`; for each adapter name it has a *role*:

* `"lisa"`: the layer's attention scores are replaced (docs/method.md, "LiSA layer"). It owns that
  adapter's weights: `lisa_ffn_up` / `lisa_ffn_down` (head alignment FFN, W1/b1 and W2/b2),
  `lisa_q_proj` / `lisa_k_proj` (low-rank Q/K on the kept rotary planes) and the
  non-trainable plane index `lisa_rotary`.
* `"anchor"`: a full attention layer right before a run of LiSA layers. It computes attention
  explicitly so that it can hand its pre-mask logits on (docs/method.md, "Anchor layer").

With adapters disabled, or when the active adapter gives the layer no role, the wrapped module
runs unchanged (bit-exact base model).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import attention as LA
from . import functional as LF
from . import transformers_compat as compat
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
        r, hidden = config.rank_of(self.layer_idx), config.ffn_hidden
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
        cache = compat.pop_cache(kwargs, self.layer_idx)
        run = self._anchor_forward if role == ROLE_ANCHOR else self._lisa_forward
        result = run(adapter, hidden_states, position_embeddings, attention_mask, cache, state)
        return self._call_base_forward_hooks(hidden_states, result)

    def _call_base_forward_hooks(self, hidden_states: torch.Tensor, result: tuple) -> tuple:
        """Run the forward hooks registered on the wrapped attention module with LiSA's output.

        Tools hook the base attention class (transformers records `output_attentions` that way, or
        wraps the module's forward in older releases: `compat.record_attentions`); the base module's
        forward does not run on the LiSA path, so its hooks are called here as if it had produced
        `result`. A hook may replace the result, as with nn.Module hooks. transformers' recording gets
        nothing when the base attention returns no probabilities (sdpa), as from the base layers.
        """
        base = self.base_layer
        recorded = compat.records_attention_weights(base.config)
        if recorded:
            compat.record_attentions(base, result)
        for hook_id, hook in list(base._forward_hooks.items()):
            if not recorded and compat.is_recording_hook(hook):
                continue
            if hook_id in base._forward_hooks_with_kwargs:
                out = hook(base, (hidden_states,), {}, result)
            else:
                out = hook(base, (hidden_states,), result)
            if out is not None:
                result = out
        return result

    def anchor_weights(self, adapter: str) -> LA.AnchorWeights:
        """This layer as an anchor of `adapter`: the base Q/K/V/O (see `attention.py`)."""
        base = self.base_layer
        return LA.AnchorWeights(
            base.q_proj, base.k_proj, base.v_proj, base.o_proj, self.num_heads, self.num_kv_heads, base.scaling,
            self.layer_idx, self.lisa_kernel[adapter],
        )

    def lisa_weights(self, adapter: str) -> LA.LisaWeights:
        """This layer as a LiSA layer of `adapter`: its low-rank Q/K and head FFN, the base V and O."""
        base = self.base_layer
        return LA.LisaWeights(
            self.lisa_q_proj[adapter], self.lisa_k_proj[adapter], self.lisa_ffn_up[adapter],
            self.lisa_ffn_down[adapter], base.v_proj, base.o_proj, self.lisa_rotary[adapter].index, self.num_heads,
            self.num_kv_heads, base.scaling, self.layer_idx, self.lisa_share[adapter], self.lisa_kernel[adapter],
        )

    def _anchor_forward(self, adapter, hidden_states, position_embeddings, attention_mask, cache, state):
        """Full attention that publishes its pre-mask logits (`attention.anchor_forward`)."""
        return LA.anchor_forward(
            self.anchor_weights(adapter), hidden_states, position_embeddings, attention_mask, cache, state,
            need_probs=LA.outputs_observed(
                self, self.base_layer, recorded=compat.records_attention_weights(self.base_layer.config)),
        )

    def lisa_projections(
        self, adapter: str, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary-embedded low-rank queries [B, H, T, r] and keys [B, G, T, r] of `adapter`."""
        return LA.lisa_projections(self.lisa_weights(adapter), hidden_states, position_embeddings)

    def lisa_logits(
        self, adapter: str, q_r: torch.Tensor, k_r: torch.Tensor, prev_logits: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """This layer's pre-mask logits [B, H, T, N] from the previous layer's [B, H, T, N]."""
        return LA.lisa_logits(self.lisa_weights(adapter), q_r, k_r, prev_logits, mask)

    def _lisa_forward(self, adapter, hidden_states, position_embeddings, attention_mask, cache, state):
        """LiSA attention (`attention.lisa_forward`); on the Triton kernels when dispatch.py says so."""
        return LA.lisa_forward(
            self.lisa_weights(adapter), hidden_states, position_embeddings, attention_mask, cache, state,
            need_probs=LA.outputs_observed(
                self, self.base_layer, recorded=compat.records_attention_weights(self.base_layer.config)),
        )

    def align_heads(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """The head-alignment FFN of `adapter` on [B, H, T, N] logits or probabilities."""
        up, down = self.lisa_ffn_up[adapter], self.lisa_ffn_down[adapter]
        return LF.head_ffn(x, up.weight, up.bias, down.weight, down.bias)

    def __repr__(self) -> str:
        return "lisa." + super().__repr__()


_MERGE_ERROR = (
    "LiSA adapters cannot be merged into the base weights: a LiSA layer computes its attention scores from the "
    "previous layer's logits (head-alignment FFN) plus a low-rank rotary score, which is a different computation "
    "graph, not a weight delta, so merge_adapter()/unmerge_adapter() cannot switch it in place. merge_and_unload() "
    "returns the compact LiSA model instead (a transformers model without the unused base Q/K of LiSA layers); "
    "unload() gives the original base model back."
)


def set_adapter_setting(model: nn.Module, adapter_name: str | None, config_field: str, layer_field: str,
                        value: Any) -> None:
    """Set `LisaConfig.<config_field>` of a loaded LiSA model (its active adapter unless `adapter_name`) and
    the per-adapter dict `<layer_field>` of every LisaAttention that adapter owns (inference settings that
    layers read on each call, e.g. the kernel mode)."""
    adapter_name = adapter_name or model.active_adapter
    setattr(model.peft_config[adapter_name], config_field, value)
    for module in model.modules():
        if isinstance(module, LisaAttention) and adapter_name in module.lisa_roles:
            getattr(module, layer_field)[adapter_name] = value
