"""The compact LiSA model on a Hub: push_to_hub writes the LiSA card; a fresh process loads it after `import lisa_peft`.

Runs against the offline local test Hub (tests/helpers/hub_server.py, fixtures in tests/helpers/hub_fixtures.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from peft import get_peft_model

from lisa_peft import LisaConfig
from lisa_peft.integrations.hub.model_card import MODEL_CARD_MARKER
from tests.helpers.tiny_assets import char_tokenizer
from tests.helpers.tiny_models import tiny_llama

LAYERS = [2, 3, 5]
INPUT_IDS = [[5, 17, 3, 60, 42, 7, 64, 1, 11, 33]]

_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch, transformers
    repo, out_path, ids = sys.argv[1], sys.argv[2], torch.tensor(eval(sys.argv[3]))
    result = {}
    try:
        transformers.AutoModelForCausalLM.from_pretrained(repo)
        result["without_import"] = "loaded"
    except Exception as err:
        result["without_import"] = f"{type(err).__name__}: {err}"
    remote = transformers.AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)  # the repo's entry
    result["remote_class"] = type(remote).__mro__[1].__name__
    with torch.no_grad():
        result["remote_logits"] = remote(ids).logits
    import lisa_peft  # what the model card says to do first

    model = transformers.AutoModelForCausalLM.from_pretrained(repo)
    result["class"] = type(model).__name__
    with torch.no_grad():
        result["logits"] = model(ids).logits
    torch.save(result, out_path)
    """
)


@pytest.mark.hub
def test_push_to_hub_card_and_fresh_process_load(hub_client, tmp_path):
    tokenizer = char_tokenizer()
    base = tiny_llama(2, vocab_size=len(tokenizer), pad_token_id=2, bos_token_id=1, eos_token_id=2)
    model = get_peft_model(base, LisaConfig(lisa_layers=LAYERS)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lisa_" in name:
                param.add_(torch.randn_like(param) * 0.05)
        expected = model(torch.tensor(INPUT_IDS)).logits
    compact = model.merge_and_unload()
    repo = hub_client.unique_repo_id("compact")
    commit = compact.push_to_hub(repo, tokenizer=tokenizer, tags=["my-tag"])
    assert commit.oid == hub_client.store.resolve(repo, "main")

    readme = hub_client.read_file(repo, "README.md").decode()
    body = readme.split("---", 2)[2].lstrip()
    assert body.startswith("**Install and import first:** `pip install lisa-peft`")
    assert "`import lisa_peft`" in body[:400]
    assert MODEL_CARD_MARKER in readme and f'from_pretrained("{repo}")' in readme
    card = ModelCard(readme)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"lisa", "lisa_llama", "my-tag"} <= set(card.data.tags)
    assert "LiSA layers: 2, 3, 5" in readme and "head_dim / r = 16 / 4 = 4.0x" in readme
    assert "this compact model" in readme and "bytes" in readme
    config = json.loads(hub_client.read_file(repo, "config.json"))
    assert config["model_type"] == "lisa_llama" and config["lisa_layers"] == LAYERS

    out_path = tmp_path / "loaded.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, repo, str(out_path), json.dumps(INPUT_IDS)],
        env=hub_client.client_env(hf_home=tmp_path / "hf-home-load"),
        capture_output=True, text=True, timeout=240, check=False, stdin=subprocess.DEVNULL,  # no remote-code prompt
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    loaded = torch.load(out_path)
    assert "trust_remote_code=True" in loaded["without_import"]  # the repo's auto_map points at its own code
    assert loaded["remote_class"] == "LisaLlamaForCausalLM"  # which imports the installed lisa-peft
    torch.testing.assert_close(loaded["remote_logits"], expected, atol=1e-5, rtol=0)
    assert loaded["class"] == "LisaLlamaForCausalLM"
    torch.testing.assert_close(loaded["logits"], expected, atol=1e-5, rtol=0)
    # The tokenizer went up with the model (the test Hub cannot serve AutoTokenizer's folder listing).
    assert json.loads(hub_client.read_file(repo, "tokenizer.json"))["model"]["vocab"] == tokenizer.get_vocab()
