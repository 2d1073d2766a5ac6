"""`LisaLlamaForCausalLM`: the compact (deployable) form of a LiSA model, a registered transformers model.

A LLaMA model whose LiSA layers (docs/method.md, "The compact model") hold only what they compute with: the low-rank
`lisa_q_proj` [H*r, d] / `lisa_k_proj` [G*r, d], the head FFN `lisa_ffn_up` [F, H] / `lisa_ffn_down` [H, F],
and the base `v_proj` / `o_proj`. Their base W_q / W_k are gone. Full layers are LLaMA's; the full layer right
before each run of LiSA layers (anchor) computes its attention explicitly to hand its logits on. The forward
of both kinds is the one of the adapter form (`lisa_peft.tuners.lisa.attention`), so the compact model gives
the `PeftModel`'s numbers. Get one with `peft_model.merge_and_unload()`; `import lisa_peft` registers the
classes with `AutoConfig` / `AutoModelForCausalLM`.

Loading is strict (`from_pretrained`): a checkpoint with missing, unexpected or wrongly shaped tensors, or
with NaN/inf values, raises `CompactCheckpointError` instead of being initialised at random.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaForCausalLM

from ...tuners.lisa import attention as LA
from ...tuners.lisa import continuous_batching
from ...tuners.lisa import transformers_compat as compat
from ...tuners.lisa.model import add_forward_state, anchor_layers
from ...tuners.lisa.state import LisaForwardState
from .configuration_lisa_llama import LISA_MODULE_NAMES, LisaLlamaConfig
from .remote_code import REMOTE_CODE_FILE, add_auto_map, remote_code_source

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CompactCheckpointError(ValueError):
    """A compact LiSA checkpoint does not match its config (missing / extra / mis-shaped / non-finite tensors)."""


def _pop_state(kwargs: dict[str, Any], layer_idx: int) -> LisaForwardState:
    state = kwargs.pop("lisa_state", None)
    if state is None:
        raise RuntimeError(
            f"LiSA attention of layer {layer_idx} was called without its forward state. Run the whole "
            "LisaLlamaForCausalLM (its decoder stack adds the state), not a single decoder layer."
        )
    return state


def _outputs_observed(module: nn.Module) -> bool:
    """Whether the module's probabilities may be read in this call (`attention.outputs_observed`); transformers'
    `output_attentions` reads them only where LLaMA's attention returns its own (eager), never under sdpa."""
    return LA.outputs_observed(module, recorded=compat.records_attention_weights(module.config))


class LisaLlamaAttention(LlamaAttention):
    """A LiSA layer of the compact model: low-rank Q/K, head FFN, base V and O (no base W_q / W_k).

    A `LlamaAttention` for transformers (which records `output_attentions` from the modules of that class),
    but none of LLaMA's projections are built: `nn.Module.__init__` only.
    """

    def __init__(self, config: LisaLlamaConfig, layer_idx: int) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.lisa_head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        d, r, bias = config.hidden_size, config.lisa_rank_of(layer_idx), config.attention_bias
        lisa_dtype = _DTYPES[config.lisa_dtype] if config.lisa_dtype else None
        self.lisa_q_proj = nn.Linear(d, self.num_heads * r, bias=bias, dtype=lisa_dtype)
        self.lisa_k_proj = nn.Linear(d, self.num_kv_heads * r, bias=bias, dtype=lisa_dtype)
        self.lisa_ffn_up = nn.Linear(self.num_heads, config.lisa_ffn_hidden, dtype=lisa_dtype)
        self.lisa_ffn_down = nn.Linear(config.lisa_ffn_hidden, self.num_heads, dtype=lisa_dtype)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=bias)
        self.register_buffer("lisa_rotary_index", self.rotary_index_from_config(), persistent=False)

    def rotary_index_from_config(self) -> torch.Tensor:
        """[G, r] kept rotary dims, `[planes, planes + D/2]` per KV head, from `config.lisa_rotary_planes`."""
        planes = torch.tensor(self.config.lisa_rotary_planes[str(self.layer_idx)], dtype=torch.long)
        return torch.cat([planes, planes + self.head_dim // 2], dim=-1)

    def lisa_weights(self) -> LA.LisaWeights:
        """This layer as the shared forward code sees it."""
        return LA.LisaWeights(
            self.lisa_q_proj, self.lisa_k_proj, self.lisa_ffn_up, self.lisa_ffn_down, self.v_proj, self.o_proj,
            self.lisa_rotary_index, self.num_heads, self.num_kv_heads, self.scaling, self.layer_idx,
            self.config.lisa_share, self.config.lisa_kernel,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [B, T, d] -> (output [B, T, d], probabilities [B, H, T, N] or None on the kernels)."""
        state = _pop_state(kwargs, self.layer_idx)
        cache = compat.pop_cache(kwargs, self.layer_idx)
        return LA.lisa_forward(self.lisa_weights(), hidden_states, position_embeddings, attention_mask, cache, state,
                                 need_probs=_outputs_observed(self))


class LisaLlamaAnchorAttention(LlamaAttention):
    """LLaMA attention (same weights and names) that hands its pre-mask logits to the LiSA layer after it."""

    def anchor_weights(self) -> LA.AnchorWeights:
        """This layer as the shared forward code sees it."""
        return LA.AnchorWeights(
            self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.config.num_attention_heads,
            self.config.num_key_value_heads, self.scaling, self.layer_idx, self.config.lisa_kernel,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [B, T, d] -> (output [B, T, d], probabilities [B, H, T, N] or None on the kernels)."""
        state = _pop_state(kwargs, self.layer_idx)
        cache = compat.pop_cache(kwargs, self.layer_idx)
        return LA.anchor_forward(
            self.anchor_weights(), hidden_states, position_embeddings, attention_mask, cache, state,
            need_probs=_outputs_observed(self),
        )


class LisaLlamaForCausalLM(LlamaForCausalLM):
    """LLaMA causal LM with compact LiSA layers (see module docstring). `config`: a `LisaLlamaConfig`."""

    config_class = LisaLlamaConfig

    def __init__(self, config: LisaLlamaConfig) -> None:
        super().__init__(config)
        layers = self.model.layers
        for idx in anchor_layers(config.lisa_layers):
            layers[idx].self_attn = LisaLlamaAnchorAttention(config, idx)
        for idx in config.lisa_layers:
            layers[idx].self_attn = LisaLlamaAttention(config, idx)
        if config.lisa_layers:
            self.model.register_forward_pre_hook(add_forward_state, with_kwargs=True)
        if config.lisa_dtype:  # LiSA weights keep their own dtype (float32 on a bf16 base, as in the PeftModel)
            self._keep_in_fp32_modules_strict = set(LISA_MODULE_NAMES) if config.lisa_dtype == "float32" else set()
        self.post_init()

    def init_continuous_batching(self, *args: Any, **kwargs: Any) -> Any:
        """Refused when the model has LiSA layers: transformers' paged KV cache cannot hold their r-wide keys
        (`tuners.lisa.continuous_batching`); reached by generate(cache_implementation="paged") and generate_batch."""
        if self.config.lisa_layers:
            raise continuous_batching.refusal("compact")
        return super().init_continuous_batching(*args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LisaLlamaAttention):  # non-persistent: rebuilt from the config on every load
            init.copy_(module.lisa_rotary_index, module.rotary_index_from_config())

    @torch.no_grad()
    def restore_rotary_index(self) -> None:
        """Refill every LiSA layer's non-persistent rotary index from the config (transformers' loading leaves
        non-persistent buffers of modules whose weights all loaded uninitialised)."""
        for module in self.modules():
            if isinstance(module, LisaLlamaAttention):
                module.lisa_rotary_index.copy_(module.rotary_index_from_config())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' `from_pretrained`, strict: refuses missing, unexpected, mis-shaped or non-finite tensors.

        Raises `CompactCheckpointError` naming the tensors; `ignore_mismatched_sizes=True` is refused.
        """
        if kwargs.get("ignore_mismatched_sizes"):
            raise CompactCheckpointError(
                "ignore_mismatched_sizes=True would initialise mis-shaped LiSA tensors at random; a compact LiSA "
                "checkpoint loads only as saved."
            )
        want_info = kwargs.pop("output_loading_info", False)
        # Mismatched tensors are reported in `info` (and refused below) instead of transformers' generic error.
        kwargs["ignore_mismatched_sizes"] = True
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        model.restore_rotary_index()
        check_loaded(model, info, str(pretrained_model_name_or_path))
        return (model, info) if want_info else model


    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, tokenizer: Any = None,
                        **kwargs: Any) -> None:
        """transformers' `save_pretrained` (config.json, model.safetensors, generation_config.json), plus the
        tokenizer when given and the remote-code entry `modeling_lisa_llama.py` that config.json's `auto_map` names
        (`remote_code`). `import lisa_peft` adds the model card (`lisa_peft.integrations.hub.hooks`)."""
        add_auto_map(self.config)
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        Path(save_directory, REMOTE_CODE_FILE).write_text(remote_code_source(), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)


def check_loaded(model: nn.Module, info: dict[str, Any], source: str) -> None:
    """Raise `CompactCheckpointError` if loading `source` left tensors missing, unexpected, mis-shaped or non-finite."""
    problems = []
    for label, keys in (("missing", info.get("missing_keys")), ("unexpected", info.get("unexpected_keys"))):
        if keys:
            problems.append(f"{label} tensors {sorted(keys)[:8]}{' ...' if len(keys) > 8 else ''}")
    if info.get("mismatched_keys"):
        shown = [f"{key} {tuple(saved)} (saved) vs {tuple(expected)} (config)"
                 for key, saved, expected in sorted(info["mismatched_keys"])[:8]]
        problems.append("shape mismatches " + "; ".join(shown))
    if info.get("error_msgs"):
        problems.append("errors " + "; ".join(map(str, info["error_msgs"][:4])))
    if not problems:
        bad = [name for name, param in model.named_parameters() if not bool(torch.isfinite(param).all())]
        if bad:
            problems.append(f"NaN/inf values in {bad[:8]}")
    if problems:
        raise CompactCheckpointError(
            f"The compact LiSA checkpoint {source} does not match its config.json: " + "; ".join(problems)
            + ". Nothing was initialised at random: re-save the model with merge_and_unload().save_pretrained(...) "
            "from the LiSA PeftModel, or check that config.json and model.safetensors belong together."
        )


__all__ = [
    "CompactCheckpointError",
    "LisaLlamaAnchorAttention",
    "LisaLlamaAttention",
    "LisaLlamaForCausalLM",
    "check_loaded",
]
