"""`LisaConfig`: the configuration of a LiSA adapter (serialised to `adapter_config.json`).

Model-independent checks run in `__post_init__`; checks that need the base model (layer range,
`r` against the head dimension, architecture) run when the adapter is injected
(`LisaModel._prepare_adapter_config`), and the defaults that depend on the model (`r`,
`ffn_hidden`, the rotary planes) are resolved there and written back into this config, so the
saved `adapter_config.json` always describes the adapter completely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig
from peft.utils import TaskType

from .peft_type import lisa_peft_type

SHARE_MODES = ("logits", "probs")
INIT_MODES = ("calibrate", "identity", "random")
RANK_ALLOCATIONS = ("uniform", "sensitivity")
KERNEL_MODES = ("auto", "triton", "torch")
LISA_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class LisaConfig(PeftConfig):
    """Configuration of a LiSA adapter (cross-layer attention sharing, docs/method.md).

    A LiSA layer replaces the self-attention scores of a pre-trained layer by a head-aligned copy
    of the previous layer's pre-mask logits (a tiny FFN over the head axis) plus a low-rank
    rotary score `Qr Kr^T / sqrt(D)`. Values and the output projection stay those of the base
    layer. The full layer right before each run of LiSA layers ("anchor") hands its logits on.

    Args:
        lisa_layers: Indices of the decoder layers whose attention is replaced, or `"auto"`: pick
            the `target_fraction` least sensitive layers from calibration data (only through
            `lisa_peft.convert`, which writes the resolved list here and the scores into
            `layer_scores`). Layer 0 and the first `min_full_layers` layers always stay full.
        target_fraction: With `lisa_layers="auto"`: the fraction of all layers to make LiSA.
        r: Rank per head of the low-rank Q/K delta (even: it is made of `r/2` rotary planes).
            `None` = head_dim/6 rounded up to an even number ("6x compression of Q and K").
            A mapping {layer index: rank} is read as `layer_ranks` (every rank even).
        layer_ranks: Per-layer ranks that override `r` for the layers they name (key: layer index,
            saved as a string). Each rank is even and at most head_dim; the layers named must be
            LiSA layers. Keys are layer indices, not module-name patterns as in LoRA's
            `rank_pattern` (hence another name). Kernels, caches and the compact model follow each
            layer's own rank. `lisa_peft.convert` writes it with `rank_allocation="sensitivity"`
            (a `layer_ranks` given by hand is kept as it is).
        rank_allocation: How `lisa_peft.convert` sets the ranks. `"uniform"` (default): `r` for every
            LiSA layer. `"sensitivity"`: the same total budget (`r` x number of LiSA layers) shared
            out in proportion to each layer's measured sensitivity (the layer probe of
            `lisa_layers="auto"`, or one run for the given layers), each rank kept within
            [r/2, min(2r, head_dim)]; the result is written to `layer_ranks`.
        ffn_hidden: Hidden width `F` of the head-alignment FFN. `None` = 2*H (H query heads).
        share: `"logits"` (default): the FFN reads the previous layer's pre-mask logits and
            `S = A + delta`. `"probs"`: the FFN reads the previous layer's probabilities and
            `S = log(relu(A) + eps) + delta`.
        init_lisa_weights: `"calibrate"`: planes chosen by their contribution to the scores on
            calibration text, FFN fitted by least squares to the residual (docs/method.md), done by
            `lisa_peft.convert` (it needs data, which `get_peft_model` does not have: there the
            default stays `"identity"`, a decision of ours). `"identity"`: FFN = identity map,
            delta = the base layer's own score restricted to the `r/2` rotary planes with the
            largest weight-norm products (copied rows of Wq/Wk). `"random"`: small random FFN
            with zero output weights (ablations).
        min_full_layers: Number of leading layers that must stay full attention (>= 1).
        lisa_dtype: dtype of the LiSA weights and their computation ("float32", "float16",
            "bfloat16"). `None` follows PEFT's rule: float32 LiSA weights on a float16/bfloat16
            base model (`autocast_adapter_dtype=True`, the default), else the base dtype.
            Whatever it is, the KV cache holds the LiSA layers' low-rank keys and values in the base
            model's dtype (the keys are rounded to it, also without a cache), so a half-precision
            base gets a cache that really shrinks.
        kernel: Attention implementation of LiSA and anchor layers (`tuners/lisa/dispatch.py`).
            `"auto"`: the Triton kernels of `lisa_kernels` when the tensors are on CUDA and Triton is
            available, else the PyTorch path. `"triton"`: always the kernels (on CPU only under
            `TRITON_INTERPRET=1`); a clear `RuntimeError` when they cannot run. `"torch"`: the PyTorch
            path (the reference). In every mode the PyTorch path runs when a gradient is needed
            (training) and for masks the kernels cannot express (left padding, padded prefill);
            the kernels return no attention probabilities (None, as sdpa). Switch a loaded model
            with `tuners.lisa.model.set_kernel_mode(model, mode)`.
        prefill_chunk_size: Inference runs long inputs as chunks of this many query rows over a growing
            KV cache (`tuners/lisa/chunked.py`), with the results of one pass and logit memory
            O(B·H·chunk·T) instead of O(B·H·T²) per layer: `model(...)` under no-grad for inputs
            longer than the chunk (with `labels` and `use_cache=False` too: a temporary cache is
            built), and `generate` (transformers' `prefill_chunk_size`, set for LiSA models unless
            the call or the generation config sets it). `None` or 0: one pass. Training (grad mode
            on) always runs in one pass. The default, 256, was the fastest of 256/512/1024 at 2,048
            and 4,096 tokens on SmolLM2-135M with similar peak memory
            (`benchmarks/prefill_chunk_size.py`, docs/inference.md).
        rotary_planes: Resolved at injection: for each LiSA layer (key = layer index as a
            string) the rotary plane indices kept per KV head, shape [G][r/2]. Set it only to
            reproduce an adapter exactly (loading does this from the saved config).
        base_model_shape: Resolved at injection: the attention shape of the base model the adapter
            was made for (`num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`,
            `head_dim`, `hidden_size`). Loading onto a base of another shape fails with a clear error
            (`LisaModel._prepare_adapter_config`, `lisa_peft.integrations.hub.check_adapter_compatible`).
            Adapters saved before this field existed load without the check.
        layer_scores: Written by `lisa_peft.convert`: per-layer sensitivity numbers that decided
            `lisa_layers="auto"` (and calibration statistics).
        task_type: PEFT's task type, which picks the `PeftModel` class. `None` (also in configs saved before
            this default existed) becomes `"CAUSAL_LM"`: `PeftModel.from_pretrained` returns a
            `PeftModelForCausalLM`, as for a LoRA causal-LM adapter. Other models need their own task type
            (`lisa_peft.integrations.task_types`): `"SEQ_CLS"` (`LlamaForSequenceClassification`), `"TOKEN_CLS"`
            (`LlamaForTokenClassification`), `"QUESTION_ANS"` (`LlamaForQuestionAnswering`),
            `"FEATURE_EXTRACTION"` (a bare `LlamaModel`); the default on such a model is a `ValueError` naming it.
        modules_to_save: Modules (by name) trained in full and saved with the adapter, as in LoRA. The
            classification task types add their head (`score` / `classifier` / `qa_outputs`) here themselves.
        target_modules: Resolved at injection: a regex naming the `self_attn` modules wrapped
            (LiSA layers and their anchors). Not meant to be set by hand.
    """

    lisa_layers: list[int] | str | None = field(
        default=None, metadata={"help": "Decoder layer indices whose self-attention LiSA replaces, or 'auto'."}
    )
    target_fraction: float | None = field(
        default=None, metadata={"help": "With lisa_layers='auto': fraction of all layers to make LiSA."}
    )
    r: int | dict[str, int] | None = field(
        default=None,
        metadata={"help": "Even rank per head of the low-rank Q/K delta (default head_dim/6, even); a mapping "
                  "{layer: rank} is read as layer_ranks."},
    )
    layer_ranks: dict[str, int] | None = field(
        default=None,
        metadata={"help": "Per-layer ranks {layer index: even rank} overriding `r` (written by rank_allocation)."},
    )
    rank_allocation: Literal["uniform", "sensitivity"] = field(
        default="uniform",
        metadata={"help": "How lisa_peft.convert sets ranks: uniform (r everywhere) or sensitivity (same budget)."},
    )
    ffn_hidden: int | None = field(
        default=None, metadata={"help": "Hidden width of the head-alignment FFN (default 2 * num heads)."}
    )
    share: Literal["logits", "probs"] = field(
        default="logits", metadata={"help": "What the head FFN reads from the previous layer: logits or probs."}
    )
    init_lisa_weights: Literal["calibrate", "identity", "random"] = field(
        default="identity",
        metadata={"help": "Initialisation of the LiSA weights: identity, random, or calibrate (on text, by "
                  "lisa_peft.convert)."},
    )
    min_full_layers: int = field(
        default=2, metadata={"help": "Number of leading layers that always keep full attention."}
    )
    lisa_dtype: str | None = field(
        default=None, metadata={"help": "dtype of LiSA weights (float32/float16/bfloat16); default: PEFT rule."}
    )
    kernel: Literal["auto", "triton", "torch"] = field(
        default="auto", metadata={"help": "Attention implementation of LiSA layers at inference."}
    )
    prefill_chunk_size: int | None = field(
        default=256,
        metadata={"help": "Query rows per chunk of a long prefill under no-grad (forward and generate); None/0: off."},
    )
    rotary_planes: dict[str, list[list[int]]] | None = field(
        default=None, metadata={"help": "Resolved per layer: rotary plane indices kept per KV head [G][r/2]."}
    )
    base_model_shape: dict[str, int] | None = field(
        default=None, metadata={"help": "Resolved at injection: attention shape of the base model (layers, heads...)."}
    )
    layer_scores: dict | None = field(
        default=None, metadata={"help": "Written by lisa_peft.convert: per-layer sensitivity and calibration stats."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Resolved at injection: regex of the wrapped self_attn modules."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter (task heads such as `score`)."},
    )

    def __post_init__(self) -> None:
        if self.task_type is None:  # LiSA adapters are causal-LM adapters (also old configs saved with null)
            self.task_type = TaskType.CAUSAL_LM
        super().__post_init__()
        self.peft_type = lisa_peft_type()
        if isinstance(self.r, Mapping):  # `r` given per layer: the same thing as `layer_ranks`
            if self.layer_ranks:
                raise ValueError(
                    "Give per-layer ranks once: either `r` as a mapping {layer: rank} or `layer_ranks`, not both."
                )
            self.layer_ranks, self.r = dict(self.r), None
        self._validate()

    def rank_of(self, layer_idx: int, default: int | None = None) -> int:
        """The rank of LiSA layer `layer_idx`: its `layer_ranks` entry, else `r` (resolved at injection),
        else `default` (e.g. `default_rank(head_dim)` for a config that was never injected)."""
        if self.layer_ranks and str(layer_idx) in self.layer_ranks:
            return self.layer_ranks[str(layer_idx)]
        rank = self.r if self.r is not None else default
        if rank is None:
            raise ValueError("`r` is not resolved yet: it gets its default when the adapter is injected.")
        return rank

    def ranks(self, default: int | None = None) -> dict[int, int]:
        """{LiSA layer: rank} for every LiSA layer; `default` as in `rank_of`."""
        return {i: self.rank_of(i, default) for i in self.lisa_layers}

    def _validate(self) -> None:
        if self.lisa_layers is None:
            raise ValueError(
                "LisaConfig needs `lisa_layers`: the decoder layer indices whose attention LiSA replaces, "
                "e.g. LisaConfig(lisa_layers=[8, 9, 10, 11]), or 'auto' with target_fraction (lisa_peft.convert)."
            )
        self._validate_options()
        if self.lisa_layers == "auto":
            if self.target_fraction is None or not 0 < self.target_fraction < 1:
                raise ValueError(
                    "lisa_layers='auto' needs `target_fraction` in (0, 1): the fraction of layers to make LiSA, "
                    f"e.g. 0.4; got {self.target_fraction!r}."
                )
            return
        if isinstance(self.lisa_layers, (str, bytes)) or not hasattr(self.lisa_layers, "__iter__"):
            raise ValueError(f"`lisa_layers` must be a list of layer indices, got {self.lisa_layers!r}.")
        layers = list(self.lisa_layers)
        if not layers:
            raise ValueError("`lisa_layers` is empty: name at least one decoder layer to replace.")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise ValueError(f"`lisa_layers` must contain integers only, got {layers!r}.")
        duplicates = sorted({i for i in layers if layers.count(i) > 1})
        if duplicates:
            raise ValueError(f"`lisa_layers` lists layers more than once: {duplicates}. Give each layer once.")
        too_shallow = sorted(i for i in layers if i < self.min_full_layers)
        if too_shallow:
            raise ValueError(
                f"`lisa_layers` contains {too_shallow}, but the first {self.min_full_layers} layers (0.."
                f"{self.min_full_layers - 1}) must keep full attention: shallow layers are the most sensitive and "
                "layer 0 has no previous layer to share. Remove them or lower `min_full_layers` (>= 1)."
            )
        self.lisa_layers = sorted(layers)
        strays = sorted(int(k) for k in (self.layer_ranks or {}) if int(k) not in self.lisa_layers)
        if strays:
            raise ValueError(
                f"`layer_ranks` names layers {strays} that are not in `lisa_layers` {self.lisa_layers}: only LiSA "
                "layers have a low-rank Q/K. Remove them or add the layers to `lisa_layers`."
            )

    def _validate_options(self) -> None:
        if isinstance(self.min_full_layers, bool) or not isinstance(self.min_full_layers, int):
            raise ValueError(f"`min_full_layers` must be an integer >= 1, got {self.min_full_layers!r}.")
        if self.min_full_layers < 1:
            raise ValueError(
                f"`min_full_layers` must be >= 1 (layer 0 has no previous layer to share), got {self.min_full_layers}."
            )
        if self.r is not None:
            if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0 or self.r % 2:
                raise ValueError(
                    f"`r` must be a positive even integer (it is made of r/2 rotary planes), got {self.r!r}."
                )
        if self.layer_ranks is not None:
            self.layer_ranks = _normalized_layer_ranks(self.layer_ranks)
        _check_choice("rank_allocation", self.rank_allocation, RANK_ALLOCATIONS)
        if self.ffn_hidden is not None and (
            isinstance(self.ffn_hidden, bool) or not isinstance(self.ffn_hidden, int) or self.ffn_hidden <= 0
        ):
            raise ValueError(f"`ffn_hidden` must be a positive integer, got {self.ffn_hidden!r}.")
        _check_choice("share", self.share, SHARE_MODES)
        _check_choice("init_lisa_weights", self.init_lisa_weights, INIT_MODES)
        _check_choice("kernel", self.kernel, KERNEL_MODES)
        if self.prefill_chunk_size is not None and (
            isinstance(self.prefill_chunk_size, bool) or not isinstance(self.prefill_chunk_size, int)
            or self.prefill_chunk_size < 0
        ):
            raise ValueError(
                f"`prefill_chunk_size` must be None, 0 (both: no chunking) or a positive integer, got "
                f"{self.prefill_chunk_size!r}."
            )
        if self.lisa_dtype is not None:
            _check_choice("lisa_dtype", self.lisa_dtype, LISA_DTYPES)


BASE_SHAPE_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")


def base_model_shape(model_config: Mapping[str, Any] | Any) -> dict[str, int]:
    """The base-model attention shape a LiSA adapter depends on, from a config dict or object."""
    def get(key: str) -> Any:
        return model_config.get(key) if isinstance(model_config, Mapping) else getattr(model_config, key, None)

    heads = get("num_attention_heads")
    return {
        "num_hidden_layers": get("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("num_key_value_heads") or heads,
        "head_dim": get("head_dim") or get("hidden_size") // heads,
        "hidden_size": get("hidden_size"),
    }


def base_shape_mismatch(saved: Mapping[str, Any] | None, actual: Mapping[str, Any]) -> str | None:
    """None if `saved` (an adapter's `base_model_shape`, None = unknown) fits `actual`, else a description."""
    if not saved:
        return None
    diffs = [f"{key} {saved[key]} (adapter) vs {actual.get(key)} (base)" for key in BASE_SHAPE_KEYS
             if key in saved and saved[key] != actual.get(key)]
    return "; ".join(diffs) or None


def _normalized_layer_ranks(pattern: Any) -> dict[str, int]:
    """{str(layer): rank} from a mapping with int or digit-string keys; ValueError naming what is wrong."""
    if not isinstance(pattern, Mapping):
        raise ValueError(f"`layer_ranks` must be a mapping {{layer index: even rank}}, got {pattern!r}.")
    normalized = {}
    for key, rank in pattern.items():
        text = str(key)
        if isinstance(key, bool) or not (isinstance(key, int) or text.isdigit()):
            raise ValueError(f"`layer_ranks` keys are layer indices (e.g. 12 or \"12\"), got {key!r}.")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or rank % 2:
            raise ValueError(
                f"`layer_ranks[{text}]` must be a positive even integer (r/2 rotary planes), got {rank!r}."
            )
        normalized[str(int(text))] = rank
    return dict(sorted(normalized.items(), key=lambda item: int(item[0])))


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")
