"""How close a LiSA model stays to its base model, and what it saves.

* `fidelity`: KL(base || LiSA) and the perplexity ratio on held-out token windows;
* `zero_shot`: multiple-choice zero-shot accuracy (lm-eval's conventions), base vs LiSA;
* `memory`: KV-cache and parameter bytes, base vs LiSA;
* `generation_check`: cached generation == full forward;
* `analysis`: `lisa-peft analyze` (per-layer figures and plots);
* `metrics`, `lm_eval_model`: the same measures for Hugging Face `evaluate` and for lm-eval.
"""
