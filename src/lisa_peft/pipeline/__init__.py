"""From a pre-trained model to a trained LiSA adapter.

* `base_models`: the base model (a Hub id, a local folder or the embedded demo model) and its tokenizer;
* `data`, `sampled_corpus`: token windows from text files, the embedded corpus or the base model's own samples;
* `calibration`, `convert`: calibrated initialisation, layer choice and the layer-wise stage;
* `training`: `LisaTrainer` and the distillation losses for `transformers.Trainer`;
* `recipe`, `recipe_files`: YAML recipes (validated before any work) and the recipes bundled with the package;
* `demo`: the demo job of the README.
"""
