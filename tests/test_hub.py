"""Pushing LiSA adapters to a Hub and loading them back (`lisa_peft.integrations.hub`, `lisa-peft push`, push_to_hub).

Tests marked `hub` run against the offline local test Hub (tests/helpers/hub_server.py, fixtures in
tests/helpers/hub_fixtures.py). Loading is checked in a FRESH Python process, the way a user loads an adapter.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model

import lisa_peft
from lisa_peft import LisaConfig, cli
from lisa_peft.integrations.hub import (
    AdapterNotFoundError,
    BaseModelLoadError,
    HubUnreachableError,
    IncompatibleAdapterError,
    LisaAdapterError,
    LisaNotRegisteredError,
    MissingAdapterFileError,
    NotALisaAdapterError,
    UnsafeAdapterFormatError,
    check_adapter_compatible,
    push_adapter,
)
from lisa_peft.integrations.hub.model_card import MODEL_CARD_MARKER, render_model_card
from tests.helpers.tiny_models import move_lisa_weights, tiny_llama

INPUT_IDS = [[5, 17, 3, 90, 42, 7, 64, 1, 11, 33]]
SUBPROCESS_TIMEOUT = 240
LAYERS = [2, 3, 5]
EVAL = {"perplexity": {"value": 31.2, "dataset": "tinyshakespeare (held-out 10%)"}}


def _load_base(base_dir: Path) -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()


def _trained(base: torch.nn.Module, seed: int, **kwargs) -> PeftModel:
    """A LiSA adapter moved away from its (identity) init, so loading the wrong one changes the logits."""
    return move_lisa_weights(get_peft_model(base, LisaConfig(lisa_layers=LAYERS, **kwargs)), seed)


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=torch.tensor(INPUT_IDS)).logits


def _python_blocks(text: str) -> list[str]:
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-base")
    tiny_llama(2).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved LiSA adapter (base_model_name_or_path = base_dir)."""
    path = tmp_path_factory.mktemp("lisa-adapter")
    _trained(_load_base(base_dir), seed=7).save_pretrained(path)
    return path


# Runs in a FRESH interpreter (LocalHub.client_env: HF_ENDPOINT/HF_TOKEN/HF_HOME set before import). First it
# loads WITHOUT `import lisa_peft` (what a user sees), then imports lisa_peft and loads every pushed adapter.
_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, transformers
    from huggingface_hub import hf_hub_download
    from peft import AutoPeftModelForCausalLM, PeftModel

    base_dir, repo, cli_repo, out_path = sys.argv[1:5]
    input_ids = torch.tensor(json.loads(sys.argv[5]))
    torch.set_num_threads(int(sys.argv[6]))

    def base():
        return transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=input_ids).logits

    result = {}
    try:
        PeftModel.from_pretrained(base(), repo)
        result["without_import"] = "loaded"
    except Exception as err:
        result["without_import"] = f"{type(err).__name__}: {err}"
    result["readme"] = open(hf_hub_download(repo, "README.md"), encoding="utf-8").read()

    import lisa_peft  # what the model card says to do first

    result["main"] = logits(PeftModel.from_pretrained(base(), repo))
    result["dev"] = logits(PeftModel.from_pretrained(base(), repo, revision="dev"))
    result["auto"] = logits(AutoPeftModelForCausalLM.from_pretrained(repo))
    result["cli"] = logits(PeftModel.from_pretrained(base(), cli_repo, revision="exp"))
    result["lisa_from_pretrained"] = logits(lisa_peft.from_pretrained(cli_repo, revision="exp"))
    torch.save(result, out_path)
    """
)


@pytest.fixture(scope="module")
def pushed(hub_server, base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """push_to_hub (private, main + branch dev) and `lisa-peft push` (CLI, branch exp); reload in a fresh process."""
    work = tmp_path_factory.mktemp("hub-roundtrip")
    repo = hub_server.unique_repo_id("lisa")
    cli_repo = hub_server.unique_repo_id("lisa-cli")
    with pytest.MonkeyPatch.context() as mp:
        hub_server.patch_client(mp, cache_dir=work / "hf-home-push")
        main = _trained(_load_base(base_dir), seed=1)
        main_commit = main.push_to_hub(repo, private=True)
        dev = _trained(_load_base(base_dir), seed=2, share="probs")
        dev_commit = dev.push_to_hub(repo, revision="dev")
        cli_model = _trained(_load_base(base_dir), seed=3)
        cli_model.save_pretrained(work / "cli-adapter")
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli_rc = cli.main(["push", str(work / "cli-adapter"), cli_repo, "--revision", "exp", "--private"])
        expected = {"main": _logits(main), "dev": _logits(dev), "cli": _logits(cli_model),
                    "base": _logits(_load_base(base_dir))}

    out_path = work / "loaded.pt"
    args = [str(base_dir), repo, cli_repo, str(out_path), json.dumps(INPUT_IDS), str(torch.get_num_threads())]
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, *args],
        env=hub_server.client_env(hf_home=work / "hf-home-load"),
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False,
    )
    assert proc.returncode == 0, f"loading in a fresh process failed:\n{proc.stderr[-6000:]}"
    return SimpleNamespace(
        repo=repo, cli_repo=cli_repo, main_commit=main_commit, dev_commit=dev_commit, cli_rc=cli_rc,
        cli_stdout=stdout.getvalue(), cli_stderr=stderr.getvalue(), expected=expected, loaded=torch.load(out_path),
    )


# ---------------------------------------------------------------------------------------------- push + load
@pytest.mark.hub
def test_push_to_hub_uploads_the_lisa_card_to_a_private_repo(pushed, hub_server):
    repo = pushed.repo
    assert hub_server.is_private(repo)
    assert pushed.main_commit.oid == hub_server.store.resolve(repo, "main")
    readme = hub_server.read_file(repo, "README.md").decode()
    assert MODEL_CARD_MARKER in readme
    assert "automatically generated" not in readme and "Provide a quick summary" not in readme
    card = ModelCard(readme)
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert {"lisa", "peft", "cross-layer-attention"} <= set(card.data.tags)
    snippet = _python_blocks(readme)[0]
    assert snippet.startswith("import lisa_peft") and f'PeftModel.from_pretrained(base, "{repo}")' in snippet
    config = json.loads(hub_server.read_file(repo, "adapter_config.json"))
    assert config["peft_type"] == "LISA" and config["lisa_layers"] == LAYERS
    assert config["base_model_shape"]["num_key_value_heads"] == 2
    dev_config = json.loads(hub_server.read_file(repo, "adapter_config.json", revision="dev"))
    assert dev_config["share"] == "probs"
    assert set(hub_server.store.branches(repo)) == {"main", "dev"}


@pytest.mark.hub
def test_fresh_process_loads_identical_logits(pushed):
    loaded, expected = pushed.loaded, pushed.expected
    torch.testing.assert_close(loaded["main"], expected["main"], rtol=0, atol=0)
    torch.testing.assert_close(loaded["dev"], expected["dev"], rtol=0, atol=0)  # revision="dev"
    torch.testing.assert_close(loaded["auto"], expected["main"], rtol=0, atol=0)  # AutoPeftModelForCausalLM
    torch.testing.assert_close(loaded["cli"], expected["cli"], rtol=0, atol=0)
    torch.testing.assert_close(loaded["lisa_from_pretrained"], expected["cli"], rtol=0, atol=0)
    assert not torch.allclose(expected["main"], expected["base"])  # the adapters change the model ...
    assert not torch.allclose(expected["main"], expected["dev"])  # ... and differ from each other


@pytest.mark.hub
def test_without_import_lisa_peft_user_sees_keyerror_and_card_says_import_first(pushed):
    assert pushed.loaded["without_import"] == "KeyError: 'LISA'"
    readme = pushed.loaded["readme"]
    assert all(block.startswith("import lisa_peft") for block in _python_blocks(readme))
    assert "`KeyError: 'LISA'`" in readme  # the card names the error the user sees


@pytest.mark.hub
def test_cli_push_creates_private_repo_and_branch(pushed, hub_server):
    assert pushed.cli_rc == 0, pushed.cli_stderr
    repo = pushed.cli_repo
    sha = hub_server.store.resolve(repo, "exp")
    assert pushed.cli_stdout.strip().endswith(sha)  # the commit URL
    assert hub_server.is_private(repo)
    assert set(hub_server.store.branches(repo)) == {"main", "exp"}
    readme = hub_server.read_file(repo, "README.md", revision="exp").decode()
    assert MODEL_CARD_MARKER in readme and f'PeftModel.from_pretrained(base, "{repo}")' in readme
    assert "<repo id>" not in readme
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert hub_server.read_file(repo, name, revision="exp")


@pytest.mark.hub
def test_push_to_hub_respects_hand_written_remote_card_and_replaces_generic_ones(hub_client, base_dir):
    hand = hub_client.unique_repo_id("hand")
    hub_client.make_repo(hand, {"README.md": b"---\nlicense: mit\n---\n\n# Our adapter\n\nWritten by us.\n"})
    generic = hub_client.unique_repo_id("generic")
    text = "---\nlibrary_name: transformers\n---\n\nThis model card has been automatically generated.\n"
    hub_client.make_repo(generic, {"README.md": text.encode()})
    model = _trained(_load_base(base_dir), seed=4)
    model.push_to_hub(hand, tags=["my-tag"])
    model.push_to_hub(generic)

    kept = ModelCard(hub_client.read_file(hand, "README.md").decode())
    assert "Written by us." in kept.text and MODEL_CARD_MARKER not in kept.text
    assert kept.data.license == "mit" and kept.data.library_name == "peft"
    assert {"lisa", "cross-layer-attention", "my-tag"} <= set(kept.data.tags)
    replaced = hub_client.read_file(generic, "README.md").decode()
    assert MODEL_CARD_MARKER in replaced and "automatically generated" not in replaced
    assert not hub_client.is_private(generic)  # private=None: public


@pytest.mark.hub
def test_push_to_hub_keeps_eval_results_of_a_previous_lisa_card(hub_client, base_dir, tmp_path):
    repo = hub_client.unique_repo_id("evals")
    model = _trained(_load_base(base_dir), seed=5)
    model.save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text(render_model_card(model, eval_results=EVAL, license="apache-2.0"))
    url = push_adapter(tmp_path, repo)
    assert url.endswith(hub_client.store.resolve(repo, "main"))
    first = ModelCard(hub_client.read_file(repo, "README.md").decode())
    assert first.data.model_name == repo and first.data.eval_results[0].metric_value == 31.2
    model.push_to_hub(repo, commit_message="retrained")
    data = ModelCard(hub_client.read_file(repo, "README.md").decode()).data
    assert data.license == "apache-2.0"
    assert [(r.metric_type, r.metric_value, r.dataset_name) for r in data.eval_results] == [
        ("perplexity", 31.2, "tinyshakespeare (held-out 10%)")
    ]


@pytest.mark.hub
def test_push_adapter_renders_a_card_when_the_folder_has_none(hub_client, adapter_dir, tmp_path):
    folder = tmp_path / "no-card"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((adapter_dir / name).read_bytes())
    repo = hub_client.unique_repo_id("nocard")
    push_adapter(folder, repo, private=True)
    readme = hub_client.read_file(repo, "README.md").decode()
    assert MODEL_CARD_MARKER in readme and f'"{repo}"' in readme and "FALLAL" in readme
    assert hub_client.is_private(repo)


# ---------------------------------------------------------------------------------------------- load errors
@pytest.mark.hub
def test_hub_load_errors_name_the_problem(hub_client, adapter_dir):
    config = (adapter_dir / "adapter_config.json").read_bytes()
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    repo = hub_client.unique_repo_id("errs")
    hub_client.make_repo(repo, {"adapter_config.json": config, "adapter_model.safetensors": weights})

    with pytest.raises(AdapterNotFoundError, match="neither a local folder nor a Hub repo"):
        lisa_peft.from_pretrained("test-org/does-not-exist")
    with pytest.raises(AdapterNotFoundError, match="Revision 'nope' does not exist"):
        lisa_peft.from_pretrained(repo, revision="nope")

    no_config = hub_client.unique_repo_id("noconfig")
    hub_client.make_repo(no_config, {"README.md": b"hi\n"})
    with pytest.raises(MissingAdapterFileError, match="has no adapter_config.json"):
        lisa_peft.from_pretrained(no_config)

    no_weights = hub_client.unique_repo_id("noweights")
    hub_client.make_repo(no_weights, {"adapter_config.json": config})
    with pytest.raises(MissingAdapterFileError, match="no adapter_model.safetensors"):
        lisa_peft.from_pretrained(no_weights)

    pickle_only = hub_client.unique_repo_id("pickle")
    hub_client.make_repo(pickle_only, {"adapter_config.json": config, "adapter_model.bin": b"not loaded"})
    with pytest.raises(UnsafeAdapterFormatError, match="only adapter_model.bin"):
        lisa_peft.from_pretrained(pickle_only)

    lora = hub_client.unique_repo_id("lora")
    hub_client.make_repo(lora, {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 8}).encode()})
    with pytest.raises(NotALisaAdapterError, match="is a LORA adapter, not a LiSA adapter"):
        lisa_peft.from_pretrained(lora)

    # The good repo loads (base from base_model_name_or_path, a local folder).
    model = lisa_peft.from_pretrained(repo)
    assert type(model).__name__ == "PeftModelForCausalLM"


@pytest.mark.hub
def test_push_with_a_wrong_token_explains_where_tokens_come_from(hub_client, adapter_dir):
    with pytest.raises(LisaAdapterError, match="HF_TOKEN") as err:
        push_adapter(adapter_dir, hub_client.unique_repo_id("badtoken"), token="hf_wrong")
    assert "refused the upload" in str(err.value)


class _NoSleep:
    """Stand-in for the `time` module inside huggingface_hub's HTTP helpers: retries without waiting."""

    @staticmethod
    def sleep(seconds: float) -> None:
        return None

    def __getattr__(self, name: str):
        import time

        return getattr(time, name)


def test_network_failure_gives_a_retry_hint(monkeypatch, tmp_path, adapter_dir):
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api
    import huggingface_hub.utils._http as hf_http

    from tests.helpers.hub_server import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_api.api, "endpoint", dead)
    monkeypatch.setattr(hf_http, "time", _NoSleep())
    monkeypatch.setenv("HF_TOKEN", "hf_any")
    with pytest.raises(HubUnreachableError, match="HF_ENDPOINT") as err:
        lisa_peft.from_pretrained("test-org/any-adapter")
    assert dead in str(err.value) and "retry" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)
    with pytest.raises(HubUnreachableError, match="retry"):
        push_adapter(adapter_dir, "test-org/any-adapter")


# ---------------------------------------------------------------------------------------------- no hub needed
def test_local_folder_loads_and_refusals(adapter_dir, base_dir, tmp_path):
    model = lisa_peft.from_pretrained(adapter_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(_load_base(base_dir), adapter_dir)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)

    with pytest.raises(UnsafeAdapterFormatError, match="remote code"):
        lisa_peft.from_pretrained(adapter_dir, trust_remote_code=True)
    with pytest.raises(UnsafeAdapterFormatError, match="safetensors only"):
        lisa_peft.from_pretrained(adapter_dir, use_safetensors=False)

    lora_dir = tmp_path / "lora"
    get_peft_model(tiny_llama(2), LoraConfig(target_modules=["q_proj"])).save_pretrained(lora_dir)
    with pytest.raises(NotALisaAdapterError, match="is a LORA adapter"):
        lisa_peft.from_pretrained(lora_dir)
    with pytest.raises(NotALisaAdapterError, match="is a LORA adapter"):
        push_adapter(lora_dir, "test-org/x")
    with pytest.raises(AdapterNotFoundError, match="is not a folder"):
        push_adapter(tmp_path / "missing", "test-org/x")

    pickle_dir = tmp_path / "pickle"
    pickle_dir.mkdir()
    (pickle_dir / "adapter_config.json").write_bytes((adapter_dir / "adapter_config.json").read_bytes())
    (pickle_dir / "adapter_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(UnsafeAdapterFormatError, match="safetensors only"):
        push_adapter(pickle_dir, "test-org/x")
    with pytest.raises(UnsafeAdapterFormatError, match="only adapter_model.bin"):
        lisa_peft.from_pretrained(pickle_dir)

    no_base = tmp_path / "no-base"
    no_base.mkdir()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (no_base / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    (no_base / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    with pytest.raises(BaseModelLoadError, match="pass base_model="):
        lisa_peft.from_pretrained(no_base)
    assert type(lisa_peft.from_pretrained(no_base, base_model=_load_base(base_dir))).__name__ == "PeftModelForCausalLM"
    with pytest.raises(BaseModelLoadError, match="Could not load the base model"):
        lisa_peft.from_pretrained(no_base, base_model=str(tmp_path / "nowhere"))


def test_cli_push_refuses_a_non_lisa_folder(tmp_path, capsys):
    get_peft_model(tiny_llama(2), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert cli.main(["push", str(tmp_path), "test-org/x"]) == 1
    assert "is a LORA adapter, not a LiSA adapter" in capsys.readouterr().err


def test_incompatible_base_model_is_explained(adapter_dir):
    with pytest.raises(IncompatibleAdapterError, match=r"num_key_value_heads 2 \(adapter\) vs 4 \(base\)"):
        lisa_peft.from_pretrained(adapter_dir, base_model=tiny_llama(4))
    with pytest.raises(IncompatibleAdapterError, match=r"num_hidden_layers 6 \(adapter\) vs 4 \(base\)") as err:
        lisa_peft.from_pretrained(adapter_dir, base_model=tiny_llama(2, num_layers=4))
    assert "LiSA layers [5] do not exist" in str(err.value)
    with pytest.raises(IncompatibleAdapterError, match=r"head_dim 16 \(adapter\) vs 8 \(base\)"):
        lisa_peft.from_pretrained(adapter_dir, base_model=tiny_llama(2, hidden_size=32))
    with pytest.raises(IncompatibleAdapterError, match=r"num_attention_heads 4 \(adapter\) vs 8 \(base\)"):
        lisa_peft.from_pretrained(adapter_dir, base_model=tiny_llama(2, num_attention_heads=8, head_dim=8))
    # Plain PEFT loading checks the recorded shape too.
    with pytest.raises(ValueError, match="made for a base model of another shape"):
        PeftModel.from_pretrained(tiny_llama(4), adapter_dir)


def test_shape_check_without_recorded_shape_uses_the_rotary_planes(adapter_dir):
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.base_model_shape = None  # an adapter saved before the field existed
    check_adapter_compatible(config, tiny_llama(2))  # fits
    with pytest.raises(IncompatibleAdapterError, match=r"rotary_planes\['2'\] is \[2\]\[2\].*needs \[4\]\[2\]"):
        check_adapter_compatible(config, tiny_llama(4).config)
    with pytest.raises(IncompatibleAdapterError, match="'mistral' model"):
        check_adapter_compatible(config, {**tiny_llama(2).config.to_dict(), "model_type": "mistral"})


def test_lost_registration_is_repaired_or_explained(adapter_dir, monkeypatch):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from lisa_peft.integrations.registration import lisa_peft_type

    monkeypatch.delitem(PEFT_TYPE_TO_CONFIG_MAPPING, lisa_peft_type())  # as if PEFT's mappings were reloaded
    assert isinstance(lisa_peft.from_pretrained(adapter_dir), PeftModel)  # registered again, loaded

    monkeypatch.delitem(PEFT_TYPE_TO_CONFIG_MAPPING, lisa_peft_type())
    monkeypatch.setattr(lisa_peft.integrations.registration, "register_lisa", lambda: None)  # and it cannot be repaired
    with pytest.raises(LisaNotRegisteredError, match="import lisa_peft") as err:
        lisa_peft.from_pretrained(adapter_dir)
    assert "KeyError" in str(err.value)
