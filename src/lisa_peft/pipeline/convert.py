"""`lisa_peft.convert`: base model + calibration text -> calibrated LiSA `PeftModel`.

Steps (each optional part controlled by the config / arguments):
1. tokenize calibration text into `num_sequences` windows of `seq_len` tokens;
2. capture every layer's attention input from the frozen base model (teacher forcing);
3. `lisa_layers="auto"`: score every candidate layer by the LM-loss increase on the calibration
   windows when it alone is a calibrated-at-init LiSA layer, and keep the `target_fraction`
   least sensitive (the attention KL is recorded too);
4. `init_lisa_weights="calibrate"`: rotary planes by partial-score energy, FFN by least squares;
   `rank_allocation="sensitivity"`: the rank budget (r x LiSA layers) shared out by each layer's
   output KL as the only LiSA layer (`allocate_ranks`), written to `layer_ranks`;
5. layer-wise stage: per LiSA layer, in order, Adam on attention KL; the previous logits are
   the base ones for the first layer of a run and the *fitted* LiSA logits inside a run.
The resolved layers, the sensitivity scores and the KL before/after every stage are written to
`config.layer_scores`, so they are saved in `adapter_config.json`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm

from ..tuners.lisa import LisaConfig
from ..tuners.lisa.config import base_model_shape
from ..tuners.lisa.layer import ROLE_ANCHOR, ROLE_LISA, LisaAttention
from ..tuners.lisa.model import add_forward_state, backbone, default_rank
from . import calibration as C
from .data import chunk_token_windows, load_texts
from .training import TeacherTopK, teacher_topk, topk_distillation_kl

logger = logging.getLogger(__name__)
SELECT_LAYERS_BY = ("loss", "output_kl")  # what `lisa_layers="auto"` ranks the candidate layers by
LAYER_SEARCH = ("single", "greedy")  # each candidate scored alone, or added one at a time given those chosen


def _resolve_shape_defaults(config: LisaConfig, model_config) -> LisaConfig:
    resolved = copy.deepcopy(config)
    resolved.r = resolved.r or default_rank(base_model_shape(model_config)["head_dim"])
    resolved.ffn_hidden = resolved.ffn_hidden or 2 * model_config.num_attention_heads
    return resolved


def _probe_layer(base_attn, layer_idx: int, config: LisaConfig, planes: torch.Tensor) -> LisaAttention:
    """A stand-alone LisaAttention around `base_attn` (the model itself is not modified)."""
    probe = LisaAttention(base_attn, layer_idx)
    probe.update_layer("probe", ROLE_LISA, config, planes)
    return probe


def lm_loss(model, input_ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of `model` on token windows [N, T]."""
    return _loss_and_output_kl(model, input_ids, None, batch_size)[0]


@contextmanager
def _lisa_layer_set(model, probes: Mapping[int, LisaAttention], config: LisaConfig) -> Iterator[None]:
    """Temporarily run `model` with each layer idx of `probes` replaced by its probe (adapter "probe"), and each
    previous layer that is not a probe itself by an anchor: a probe after a probe reads the fitted logits."""
    layers = C.decoder_layers(model)
    originals = {}
    for idx, probe in probes.items():
        originals[idx] = layers[idx].self_attn
        if idx - 1 not in probes:
            originals[idx - 1] = layers[idx - 1].self_attn
            anchor = LisaAttention(C.base_attention(layers[idx - 1]), idx - 1)
            anchor.update_layer("probe", ROLE_ANCHOR, config)
            anchor.set_adapter("probe", inference_mode=True)
            layers[idx - 1].self_attn = anchor
        probe.set_adapter("probe", inference_mode=True)
        layers[idx].self_attn = probe
    hook = backbone(model).register_forward_pre_hook(add_forward_state, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
        for idx, module in originals.items():
            layers[idx].self_attn = module


@torch.no_grad()
def _loss_and_output_kl(
    model, input_ids: torch.Tensor, teacher: TeacherTopK | None, batch_size: int = 4
) -> tuple[float, float]:
    """Mean next-token cross-entropy of `model` on windows [N, T] and its top-k KL(teacher || model)
    (NaN without a teacher)."""
    device = next(model.parameters()).device
    loss = kl = 0.0
    for start in range(0, input_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        batch = input_ids[sl].to(device)
        out = model(batch, labels=batch, use_cache=False)
        n = batch.shape[0]
        loss += out.loss.item() * n
        if teacher is not None:
            logprobs, ids = teacher.logprobs[sl].to(device), teacher.ids[sl].to(device)
            kl += topk_distillation_kl(out.logits, logprobs, ids).item() * n
    n_total = input_ids.shape[0]
    return loss / n_total, (kl / n_total if teacher is not None else math.nan)


@torch.no_grad()
def layer_sensitivity(
    model,
    inputs: C.AttentionInputs,
    input_ids: torch.Tensor,
    config: LisaConfig,
    progress: bool = True,
    fit_steps: int = 0,
    fit_lr: float = 3e-3,
    candidates: list[int] | None = None,
    probes: dict[int, LisaAttention] | None = None,
) -> dict[str, dict[int, float]]:
    """Per candidate layer, made LiSA alone (calibrated init, then `fit_steps` layer-wise steps):

    * "loss": increase of the LM loss on the probe windows input_ids [N, T];
    * "output_kl": KL(base || model) of the next-token distributions on those windows (top-64);
    * "kl": attention KL to the base layer with the true previous logits (diagnostic).
    Shallow layers can have a small attention KL and still a large effect on the output, hence the
    decision is taken on the model's output ("loss" or "output_kl", see `convert`).
    The layer-wise fit uses the calibration windows of `inputs` (all of them, not only the probe's).
    candidates: the layers to score (default: every layer from `min_full_layers` on).
    probes: a dict that receives each candidate's fitted probe layer (adapter "probe"), for `greedy_layers`.
    """
    layers = C.decoder_layers(model)
    resolved = _resolve_shape_defaults(config, model.config)
    resolved.init_lisa_weights = "identity"
    teacher = teacher_topk(model, input_ids)
    base_loss, _ = _loss_and_output_kl(model, input_ids, teacher)
    scores: dict[str, dict[int, float]] = {"loss": {}, "output_kl": {}, "kl": {}}
    candidates = range(config.min_full_layers, len(layers)) if candidates is None else candidates
    for idx in tqdm(candidates, desc="layer sensitivity", disable=not progress):
        attn = C.base_attention(layers[idx])
        rope = inputs.position_embeddings
        planes = C.activation_planes(attn, inputs, idx, resolved.rank_of(idx) // 2)
        probe = _probe_layer(attn, idx, resolved, planes)
        prev = C.base_logits(C.base_attention(layers[idx - 1]), inputs.hidden[idx - 1], rope)
        target = C.base_logits(attn, inputs.hidden[idx], rope)
        C.fit_head_ffn(probe, "probe", prev, target, inputs.hidden[idx], rope)
        if fit_steps > 0:
            with torch.enable_grad():
                C.fit_layer(probe, "probe", inputs.hidden[idx], rope, prev, target, steps=fit_steps, lr=fit_lr)
        scores["kl"][idx] = C.evaluate_layer_kl(probe, "probe", inputs.hidden[idx], rope, prev, target)
        with _lisa_layer_set(model, {idx: probe}, resolved):
            loss, kl = _loss_and_output_kl(model, input_ids, teacher)
        scores["loss"][idx] = loss - base_loss
        scores["output_kl"][idx] = kl
        if probes is not None:
            probes[idx] = probe
    return scores


@torch.no_grad()
def greedy_layers(
    model,
    probes: Mapping[int, LisaAttention],
    single_scores: Mapping[int, float],
    input_ids: torch.Tensor,
    config: LisaConfig,
    count: int,
    by: str = "loss",
    progress: bool = True,
) -> dict[str, Any]:
    """Choose `count` layers one at a time, each time the candidate whose addition raises the model's score least
    given the layers already chosen (a probe after a probe reads its fitted logits), so that layers that do well
    alone but badly together are not all taken.

    probes: {layer: probe fitted alone} from `layer_sensitivity(..., probes=...)`; single_scores: its scores of
    kind `by` ("loss": LM-loss increase, "output_kl"), measured on the same windows input_ids [N, T]. Lazy greedy:
    a candidate's last measured increase is taken as a lower bound of its next one, so only the candidates that
    could still be the best are measured again. Returns {"order": layers in pick order, "score": the model's score
    after each pick, "evaluations": model evaluations run}.
    """
    if by not in SELECT_LAYERS_BY:
        raise ValueError(f"by={by!r}: choose {' or '.join(map(repr, SELECT_LAYERS_BY))}.")
    config = _resolve_shape_defaults(config, model.config)
    teacher = teacher_topk(model, input_ids)
    base_loss, _ = _loss_and_output_kl(model, input_ids, teacher)

    def score(layers: list[int]) -> float:
        with _lisa_layer_set(model, {i: probes[i] for i in layers}, config):
            loss, kl = _loss_and_output_kl(model, input_ids, teacher)
        return loss - base_loss if by == "loss" else kl

    return lazy_greedy({idx: float(single_scores[idx]) for idx in probes}, score, count, progress=progress)


def lazy_greedy(
    single: Mapping[int, float], score: Callable[[list[int]], float], count: int, progress: bool = False
) -> dict[str, Any]:
    """Pick `count` items one at a time, each time the one whose addition raises score(chosen) least.

    single: {item: score([item])}, the increases over the empty set (score([]) is taken as 0). An item's last
    measured increase is taken as a lower bound of its next one, so after each pick only the items that could
    still be the best are measured again. Returns {"order", "score" (after each pick), "evaluations"}.
    """
    bound = dict(single)
    fresh = set(bound)  # increases measured given the current choice
    chosen: list[int] = []
    after: list[float] = []
    current, evaluations = 0.0, 0
    bar = tqdm(total=min(count, len(bound)), desc="greedy layer choice", disable=not progress)
    while len(chosen) < count and bound:
        item = min(bound, key=lambda i: (bound[i], i))
        if item not in fresh:
            bound[item] = score(chosen + [item]) - current
            evaluations += 1
            fresh.add(item)
            if bound[item] > min(bound.values()):
                continue
        chosen.append(item)
        current += bound.pop(item)
        after.append(float(f"{current:.6g}"))
        fresh = set()  # every other increase may have changed with this pick
        bar.update(1)
        bar.set_postfix(layer=item, score=f"{current:.4f}", evaluations=evaluations)
    bar.close()
    return {"order": chosen, "score": after, "evaluations": evaluations}


def lisa_sensitivity(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     min_full_layers: int = 2, progress: bool = True) -> list[float | None]:
    """Per layer: LM-loss increase (nats/token) when that layer alone is a calibrated LiSA layer.

    input_ids [N, T] (unpadded windows). None for the first `min_full_layers` layers, which stay
    full. The `sensitivity_fn` of `lisa_peft.evaluation.analysis.analyze` (`lisa-peft analyze --sensitivity`).
    """
    inputs = C.capture_attention_inputs(model, input_ids, progress=progress)
    config = LisaConfig(lisa_layers="auto", target_fraction=0.5, min_full_layers=min_full_layers)
    scores = layer_sensitivity(model, inputs, input_ids, config, progress=progress)["loss"]
    return [scores.get(i) for i in range(model.config.num_hidden_layers)]


lisa_sensitivity.unit = "LM-loss increase as the only LiSA layer (nats)"


def choose_layers(scores: dict[int, float], num_layers: int, fraction: float) -> list[int]:
    """The round(fraction * num_layers) layers with the lowest scores, sorted."""
    k = max(1, min(len(scores), round(fraction * num_layers)))
    return sorted(sorted(scores, key=scores.__getitem__)[:k])


def _sensitivity_record(sensitivity: dict[str, dict[int, float]]) -> dict[str, dict[str, float]]:
    """`layer_scores` entries for `layer_sensitivity`'s scores: {"sensitivity_<kind>": {layer: score}}."""
    return {f"sensitivity_{kind}": {str(k): float(f"{v:.6g}") for k, v in values.items()}
            for kind, values in sensitivity.items()}


def allocate_ranks(scores: dict[int, float], r: int, head_dim: int) -> dict[int, int]:
    """{layer: even rank} sharing the budget r x len(scores) in proportion to `scores` (sensitivity).

    Every layer starts at r/2 (even, >= 2); two ranks at a time go to the layer whose score per rank
    is highest, never above min(2r, head_dim), until the budget is spent. Equal scores give r everywhere.
    """
    low = max(2, (r // 2) // 2 * 2)
    high = max(low, min(2 * r, head_dim) // 2 * 2)
    ranks = {idx: low for idx in scores}
    left = r * len(scores) - low * len(scores)
    weight = {idx: max(float(score), 0.0) + 1e-12 for idx, score in scores.items()}
    while left >= 2:
        growable = [idx for idx in ranks if ranks[idx] + 2 <= high]
        if not growable:
            break
        idx = max(growable, key=lambda i: (weight[i] / ranks[i], -i))
        ranks[idx] += 2
        left -= 2
    return ranks


def convert(
    model,
    tokenizer,
    config: LisaConfig,
    calibration_texts: list[str] | None = None,
    *,
    num_sequences: int = 16,
    seq_len: int = 256,
    layerwise_steps: int = 200,
    layerwise_lr: float = 2e-3,
    batch_size: int = 4,
    adapter_name: str = "default",
    progress: bool = True,
    stage_callback: Callable[[str, PeftModel], Any] | None = None,
    calibration_ids: torch.Tensor | None = None,
    sensitivity_sequences: int = 16,
    sensitivity_fit_steps: int = 100,
    select_layers_by: str = "loss",
    layer_search: str = "single",
) -> PeftModel:
    """Turn a pre-trained LLaMA model into a calibrated LiSA `PeftModel`.

    model: a transformers LLaMA causal LM (not yet PEFT-wrapped); tokenizer: its tokenizer.
    calibration_texts: text sources for `lisa_peft.pipeline.data.load_texts` (local .txt paths or
    `hf:NAME[:CONFIG][:SPLIT]`); `None` = the embedded default corpus. Returns the PeftModel; the
    decisions and their numbers are in `model.peft_config[adapter_name].layer_scores`.
    stage_callback(stage, peft_model) runs after the calibrated init ("init") and after the
    layer-wise stage ("layerwise"); what it returns (e.g. a perplexity) is recorded under
    `layer_scores["stages"]`. calibration_ids: token windows [N, T] to use instead of
    tokenizing `calibration_texts` (then `tokenizer` may be None). sensitivity_sequences: how
    many calibration windows the per-layer loss probe of `lisa_layers="auto"` runs on. layer_search: how
    `lisa_layers="auto"` picks its layers from the probe's scores: "single" keeps the least sensitive layers, each
    scored alone; "greedy" adds them one at a time given those already chosen (`greedy_layers`).
    """
    if select_layers_by not in SELECT_LAYERS_BY:
        raise ValueError(f"select_layers_by={select_layers_by!r}: choose {' or '.join(map(repr, SELECT_LAYERS_BY))}.")
    if layer_search not in LAYER_SEARCH:
        raise ValueError(f"layer_search={layer_search!r}: choose {' or '.join(map(repr, LAYER_SEARCH))}.")
    config = copy.deepcopy(config)
    if calibration_ids is not None:
        input_ids = calibration_ids
        seq_len = input_ids.shape[1]
    else:
        input_ids = chunk_token_windows(tokenizer, load_texts(calibration_texts), num_sequences, seq_len)
    inputs = C.capture_attention_inputs(model, input_ids, batch_size=batch_size, progress=progress)
    layers = C.decoder_layers(model)
    num_layers = len(layers)
    scores_record: dict = {"calibration": {"num_sequences": int(input_ids.shape[0]), "seq_len": int(seq_len)}}

    sensitivity = None
    if config.lisa_layers == "auto":
        probe_ids = input_ids[: max(1, sensitivity_sequences)]  # the loss probe runs the whole model per layer
        probes: dict[int, LisaAttention] | None = {} if layer_search == "greedy" else None
        sensitivity = layer_sensitivity(model, inputs, probe_ids, config, progress=progress,
                                        fit_steps=sensitivity_fit_steps, fit_lr=layerwise_lr, probes=probes)
        config.lisa_layers = choose_layers(sensitivity[select_layers_by], num_layers, config.target_fraction)
        scores_record.update(_sensitivity_record(sensitivity))
        if probes is not None:
            search = greedy_layers(model, probes, sensitivity[select_layers_by], probe_ids, config,
                                   len(config.lisa_layers), by=select_layers_by, progress=progress)
            config.lisa_layers = sorted(search["order"])
            scores_record["layer_search"] = {"by": select_layers_by, **search}
        logger.info("lisa_layers='auto' chose %s", config.lisa_layers)

    if config.rank_allocation == "sensitivity" and not config.layer_ranks:
        if sensitivity is None:
            probe_ids = input_ids[: max(1, sensitivity_sequences)]
            sensitivity = layer_sensitivity(model, inputs, probe_ids, config, progress=progress,
                                            fit_steps=sensitivity_fit_steps, fit_lr=layerwise_lr,
                                            candidates=list(config.lisa_layers))
            scores_record.update(_sensitivity_record(sensitivity))
        resolved = _resolve_shape_defaults(config, model.config)
        head_dim = base_model_shape(model.config)["head_dim"]
        by_layer = {idx: sensitivity["output_kl"][idx] for idx in config.lisa_layers}
        ranks = allocate_ranks(by_layer, resolved.r, head_dim)
        config.r = resolved.r
        config.layer_ranks = {str(idx): rank for idx, rank in ranks.items()}
        scores_record["rank_allocation"] = {"by": "output_kl", "budget": resolved.r * len(ranks),
                                            "ranks": dict(config.layer_ranks)}
        logger.info("rank_allocation='sensitivity' gave ranks %s", config.layer_ranks)

    calibrate = config.init_lisa_weights == "calibrate"
    if calibrate:
        resolved = _resolve_shape_defaults(config, model.config)
        config.rotary_planes = dict(config.rotary_planes or {})
        for idx in config.lisa_layers:
            attn = C.base_attention(layers[idx])
            half = resolved.rank_of(idx) // 2
            config.rotary_planes[str(idx)] = C.activation_planes(attn, inputs, idx, half).tolist()

    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    config = peft_model.peft_config[adapter_name]
    rope = inputs.position_embeddings
    wrapped = C.decoder_layers(peft_model)
    base_logits_cache: dict[int, torch.Tensor] = {}

    def base_logits(idx: int) -> torch.Tensor:
        if idx not in base_logits_cache:
            for old in [k for k in base_logits_cache if k < idx - 1]:  # layers are visited in order:
                del base_logits_cache[old]  # keep only [N, H, T, T] of idx - 1 and idx
            base_logits_cache[idx] = C.base_logits(C.base_attention(wrapped[idx]), inputs.hidden[idx], rope)
        return base_logits_cache[idx]

    if calibrate:
        for idx in tqdm(config.lisa_layers, desc="calibrated init", disable=not progress):
            layer = wrapped[idx].self_attn
            C.fit_head_ffn(layer, adapter_name, base_logits(idx - 1), base_logits(idx), inputs.hidden[idx], rope)
    if stage_callback is not None:
        scores_record["stages"] = {"init": stage_callback("init", peft_model)}

    per_layer: dict[str, dict[str, float]] = {}
    fitted_prev: dict[int, torch.Tensor] = {}
    bar = tqdm(config.lisa_layers, desc="layer-wise stage", disable=not progress or layerwise_steps <= 0)
    for idx in bar:
        layer = wrapped[idx].self_attn
        prev = fitted_prev.pop(idx - 1, None)
        prev = base_logits(idx - 1) if prev is None else prev
        target = base_logits(idx)
        hidden = inputs.hidden[idx]
        record = {"kl_init": C.evaluate_layer_kl(layer, adapter_name, hidden, rope, prev, target)}
        if layerwise_steps > 0:
            def show(step: int, loss: float, _idx=idx) -> None:
                if step % 20 == 0:
                    bar.set_postfix(layer=_idx, step=step, kl=f"{loss:.3f}")

            C.fit_layer(
                layer, adapter_name, hidden, rope, prev, target,
                steps=layerwise_steps, lr=layerwise_lr, batch_size=batch_size, progress=show,
            )
            record["kl_layerwise"] = C.evaluate_layer_kl(layer, adapter_name, hidden, rope, prev, target)
        if idx + 1 in config.lisa_layers:  # the next LiSA layer reads this layer's (fitted) logits
            with torch.no_grad():
                fitted_prev[idx] = torch.cat([
                    C.lisa_layer_logits(layer, adapter_name, hidden[s : s + batch_size], rope, prev[s : s + batch_size])
                    for s in range(0, prev.shape[0], batch_size)
                ])
        per_layer[str(idx)] = {k: round(v, 5) for k, v in record.items() if math.isfinite(v)}
    if stage_callback is not None and layerwise_steps > 0:
        scores_record.setdefault("stages", {})["layerwise"] = stage_callback("layerwise", peft_model)
    scores_record["layers"] = per_layer
    scores_record["layerwise_steps"] = layerwise_steps
    config.layer_scores = scores_record
    return peft_model
