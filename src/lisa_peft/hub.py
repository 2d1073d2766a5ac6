"""Pushing LiSA adapters to a Hugging Face Hub and loading them back (safetensors only, no remote code).

* `push_adapter(adapter_dir, repo_id)`: upload `adapter_config.json`, `adapter_model.safetensors` and the
  LiSA model card `README.md` of a saved adapter (CLI: `lisa-peft push`).
* `PeftModel.push_to_hub` of a LiSA model goes through `push_model_to_hub` (installed by
  `lisa_peft.registration.install_hub_hooks`): the LiSA card is uploaded, never a generic one.
* `from_pretrained(adapter_id)`: fetch the adapter, check it (`check_adapter_compatible`), load the base model
  named in its config and return the `PeftModel`.

Tokens come from the usual huggingface_hub sources (`token=`, `HF_TOKEN`, the stored `hf auth login`), the
endpoint from `HF_ENDPOINT`.

"lisa_peft not imported" (decision): PEFT learns the `LISA` method only when `import lisa_peft` runs in that
process; without it `PeftModel.from_pretrained` / `AutoPeftModel*` fail with `KeyError: 'LISA'` (and
`PeftType("LISA")` with "'LISA' is not a valid PeftType"). We cannot run code in a process that never
imports us, and we do not install a `.pth` start-up hook (it would run in every Python process of the
environment, slow down and surprise unrelated programs, and is invisible to the user); PEFT 0.21 has no
plugin entry point to register with instead. So: the model card's usage snippet starts with
`import lisa_peft` and names that error verbatim (searchable); `lisa_peft.from_pretrained` is the
one-call loader (it imports us by construction); and where a PEFT call inside it still meets the error
(the registration was lost, e.g. PEFT's mappings were reloaded), it registers again and retries once,
else raises `LisaNotRegisteredError` with `UNREGISTERED_HINT`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .registration import PEFT_TYPE_NAME

if TYPE_CHECKING:
    from peft import PeftModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
README_NAME = "README.md"

UNREGISTERED_HINT = (
    "PEFT does not know the LISA method in this process: run `import lisa_peft` before loading a LiSA adapter "
    "(it registers LISA with PEFT). Every process that loads the adapter needs the import, including worker "
    "processes started with multiprocessing 'spawn', DataLoader workers, torchrun / accelerate ranks and serving "
    "processes; `lisa_peft.from_pretrained(...)` does it for you."
)

__all__ = [
    "UNREGISTERED_HINT",
    "AdapterNotFoundError",
    "BaseModelLoadError",
    "HubUnreachableError",
    "IncompatibleAdapterError",
    "LisaAdapterError",
    "LisaNotRegisteredError",
    "MissingAdapterFileError",
    "NotALisaAdapterError",
    "UnsafeAdapterFormatError",
    "check_adapter_compatible",
    "from_pretrained",
    "push_adapter",
    "push_model_to_hub",
]

T = TypeVar("T")


class LisaAdapterError(ValueError):
    """A LiSA adapter could not be pushed or loaded (the message says why and what to do)."""


class AdapterNotFoundError(LisaAdapterError):
    """No such local folder, Hub repo or revision (or no access to it)."""


class MissingAdapterFileError(LisaAdapterError):
    """The folder / repo lacks a file a LiSA adapter needs (the message names it)."""


class NotALisaAdapterError(LisaAdapterError):
    """The folder / repo holds another kind of adapter (or none)."""


class UnsafeAdapterFormatError(LisaAdapterError):
    """Only pickle weights (adapter_model.bin) or remote code: refused, safetensors only."""


class IncompatibleAdapterError(LisaAdapterError):
    """The adapter was made for a base model of another shape."""


class BaseModelLoadError(LisaAdapterError):
    """The base model named by the adapter could not be loaded."""


class HubUnreachableError(LisaAdapterError):
    """The Hub could not be reached (network failure, or offline without a cached copy)."""


class LisaNotRegisteredError(RuntimeError):
    """PEFT does not know the LISA method in this process (see `UNREGISTERED_HINT`)."""


# ---------------------------------------------------------------------------------------------- errors
def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _is_network_error(err: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & {"TransportError", "ConnectError", "TimeoutException", "NetworkError"})


def _network_error(what: str, err: BaseException) -> HubUnreachableError:
    from huggingface_hub import constants

    return HubUnreachableError(
        f"Could not reach the Hub at {_endpoint()} for {what} ({type(err).__name__}: {err}). Check the network "
        "connection (and HTTPS_PROXY) and retry. HF_ENDPOINT selects the Hub endpoint (for a mirror); with "
        f"HF_HUB_OFFLINE=1 files already in the local cache ({constants.HF_HUB_CACHE}) are used without a network."
    )


def _is_unregistered_error(err: BaseException) -> bool:
    text = str(err)
    if isinstance(err, KeyError):
        return bool(err.args) and str(err.args[0]) in (PEFT_TYPE_NAME, f"PeftType.{PEFT_TYPE_NAME}")
    return f"'{PEFT_TYPE_NAME}' is not a valid PeftType" in text


def _with_registration(call: Callable[[], T]) -> T:
    """Run a PEFT call; if PEFT does not know LISA, register it again and retry once, else explain."""
    try:
        return call()
    except (KeyError, ValueError) as err:
        if not _is_unregistered_error(err):
            raise
        from . import registration

        registration.register_lisa()
        try:
            return call()
        except (KeyError, ValueError) as again:
            if _is_unregistered_error(again):
                raise LisaNotRegisteredError(f"{type(again).__name__}: {again}. {UNREGISTERED_HINT}") from again
            raise


@contextmanager
def _hub_errors(source: str, revision: str | None, what: str) -> Iterator[None]:
    """Turn huggingface_hub's errors for `source` into LisaAdapterError subclasses with a hint."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except LocalEntryNotFoundError as err:
        raise _network_error(what, err) from err
    except RevisionNotFoundError as err:
        raise AdapterNotFoundError(f"Revision {revision!r} does not exist in the Hub repo {source}.") from err
    except RepositoryNotFoundError as err:
        raise AdapterNotFoundError(
            f"{source} is neither a local folder nor a Hub repo at {_endpoint()} that this token can read: it does not "
            "exist, or it is private/gated. Check the name; for a private repo pass token=... or set HF_TOKEN / run "
            "`hf auth login`."
        ) from err
    except EntryNotFoundError:
        raise  # a file missing in the repo: the caller names it
    except HFValidationError as err:
        raise AdapterNotFoundError(f"{source} is neither a local folder nor a valid Hub repo id ({err}).") from err
    except Exception as err:
        if _is_network_error(err):
            raise _network_error(what, err) from err
        raise


# ---------------------------------------------------------------------------------------------- adapter files
def _read_adapter_config(folder: Path, source: str) -> dict[str, Any]:
    """The raw adapter_config.json of `folder`, checked to be a LiSA adapter."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise MissingAdapterFileError(
            f"{source} has no {CONFIG_NAME}: it is not a PEFT adapter. Save a LiSA adapter with "
            "model.save_pretrained(folder), which writes adapter_config.json, adapter_model.safetensors and README.md."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise NotALisaAdapterError(f"{source}: {CONFIG_NAME} is not valid JSON ({err}).") from err
    peft_type = raw.get("peft_type") if isinstance(raw, dict) else None
    if peft_type is None:
        raise NotALisaAdapterError(f"{source}: {CONFIG_NAME} has no peft_type, so it is not a PEFT adapter config.")
    if str(peft_type).upper() != PEFT_TYPE_NAME:
        raise NotALisaAdapterError(
            f"{source} is a {peft_type} adapter, not a LiSA adapter (peft_type {PEFT_TYPE_NAME!r}). Load it with "
            "peft.PeftModel.from_pretrained(base, ...) instead."
        )
    return raw


def _check_local_weights(folder: Path, source: str) -> None:
    if (folder / WEIGHTS_NAME).is_file():
        return
    if (folder / PICKLE_WEIGHTS_NAME).is_file():
        raise _pickle_only(source)
    raise MissingAdapterFileError(f"{source} has no {WEIGHTS_NAME} (the LiSA weights).")


def _pickle_only(source: str) -> UnsafeAdapterFormatError:
    return UnsafeAdapterFormatError(
        f"{source} has only {PICKLE_WEIGHTS_NAME} (pickle) and no {WEIGHTS_NAME}. lisa-peft loads and uploads "
        "safetensors only (pickle files can run code when loaded). Re-save the adapter with "
        "model.save_pretrained(folder) (safe_serialization=True, the default)."
    )


def _fetch_adapter(adapter_id: str | os.PathLike, revision: str | None, token: str | bool | None) -> Path:
    """A local folder with the adapter's config and safetensors weights (downloaded from the Hub if needed)."""
    from huggingface_hub import file_exists, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    local = Path(adapter_id).expanduser()
    source = str(adapter_id)
    if local.is_dir():
        _read_adapter_config(local, source)
        _check_local_weights(local, source)
        return local
    with _hub_errors(source, revision, f"the adapter {source}"):
        try:
            config_path = Path(hf_hub_download(source, CONFIG_NAME, revision=revision, token=token))
        except RemoteEntryNotFoundError as err:
            raise MissingAdapterFileError(
                f"The Hub repo {source} (revision {revision or 'main'}) has no {CONFIG_NAME}: it is not a PEFT adapter."
            ) from err
    folder = config_path.parent  # .../snapshots/<commit>: fetch the weights of exactly that commit
    _read_adapter_config(folder, source)
    commit = folder.name
    with _hub_errors(source, revision, f"the weights of {source}"):
        try:
            hf_hub_download(source, WEIGHTS_NAME, revision=commit, token=token)
        except RemoteEntryNotFoundError as err:
            if file_exists(source, PICKLE_WEIGHTS_NAME, revision=commit, token=token):
                raise _pickle_only(f"The Hub repo {source}") from err
            raise MissingAdapterFileError(
                f"The Hub repo {source} (revision {revision or 'main'}) has {CONFIG_NAME} but no {WEIGHTS_NAME} "
                "(the LiSA weights)."
            ) from err
    return folder


# ---------------------------------------------------------------------------------------------- compatibility
def check_adapter_compatible(config: Any, base_model: Any) -> None:
    """Raise `IncompatibleAdapterError` if the LiSA adapter `config` does not fit `base_model`.

    base_model: a model (its `.config` is used), a transformers config or a config dict. Checks the
    architecture, the base shape recorded in the adapter (`base_model_shape`: layers, heads, KV heads,
    head_dim, hidden size), the LiSA layer range, `r` against head_dim and the saved rotary planes
    (shape [KV heads][r/2], values below head_dim/2).
    """
    from .tuners.lisa import LisaConfig
    from .tuners.lisa.config import base_model_shape, base_shape_mismatch
    from .tuners.lisa.model import SUPPORTED_MODEL_TYPES

    if not isinstance(config, LisaConfig):
        raise NotALisaAdapterError(
            f"check_adapter_compatible needs a LisaConfig, got {type(config).__name__} "
            f"(peft_type {getattr(config, 'peft_type', None)!r})."
        )
    base_config = getattr(base_model, "config", base_model)
    get = base_config.get if isinstance(base_config, dict) else lambda key: getattr(base_config, key, None)
    problems = []
    model_type = get("model_type")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"the base model is a {model_type!r} model; LiSA supports {list(SUPPORTED_MODEL_TYPES)}")
    shape = base_model_shape(base_config)
    mismatch = base_shape_mismatch(config.base_model_shape, shape)
    if mismatch:
        problems.append(mismatch)
    layers = config.lisa_layers if isinstance(config.lisa_layers, list) else []
    beyond = [i for i in layers if i >= shape["num_hidden_layers"]]
    if beyond:
        problems.append(f"LiSA layers {beyond} do not exist in a base model with {shape['num_hidden_layers']} layers")
    head_dim, kv_heads = shape["head_dim"], shape["num_key_value_heads"]
    if config.r is not None and config.r > head_dim:
        problems.append(f"r={config.r} is larger than the base model's head_dim {head_dim}")
    for key, planes in sorted((config.rotary_planes or {}).items(), key=lambda kv: int(kv[0])):
        widths = {len(row) for row in planes}
        values = [v for row in planes for v in row]
        if len(planes) != kv_heads or (config.r is not None and widths != {config.r // 2}) or (
            values and max(values) >= head_dim // 2
        ):
            saved = f"[{len(planes)}][{'/'.join(map(str, sorted(widths)))}]"
            problems.append(
                f"rotary_planes[{key!r}] is {saved} with plane indices up to {max(values) if values else '-'}; "
                f"this base needs [{kv_heads}][{(config.r or 0) // 2}] (KV heads x r/2) with indices < "
                f"{head_dim // 2} (head_dim/2)"
            )
            break
    if problems:
        made_for = config.base_model_shape or "not recorded"
        raise IncompatibleAdapterError(
            f"This LiSA adapter (base_model_name_or_path={config.base_model_name_or_path!r}) does not fit the base "
            "model: " + "; ".join(problems)
            + f". Adapter made for {made_for}; base model shape {shape}. Load it onto the base model it was made for."
        )


# ---------------------------------------------------------------------------------------------- loading
def _resolve_alias(name: str) -> str:
    """`name`, or the local folder of a project alias (`lisa_peft.base_models`, imported lazily)."""
    try:
        from .base_models import DEMO_MODEL, resolve_base_model
    except ImportError:  # pragma: no cover - the module comes with another issue
        return name
    if name.strip().lower() == DEMO_MODEL:
        return resolve_base_model(name)
    return name


def _load_base_model(config: Any, base_model: Any, dtype: Any, token: str | bool | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(base_model, torch.nn.Module):
        return base_model
    name = base_model or config.base_model_name_or_path
    if not name:
        raise BaseModelLoadError(
            "The adapter's config does not name its base model (base_model_name_or_path is empty): pass "
            "base_model=... (a Hub id, a local folder or a loaded model)."
        )
    name = str(name)
    kwargs: dict[str, Any] = {"token": token, "trust_remote_code": False, "use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if base_model is None and config.revision:
        kwargs["revision"] = config.revision
    try:
        path = _resolve_alias(name)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as err:
        if _is_network_error(err) or _is_network_error(err.__cause__ or err):
            raise _network_error(f"the base model {name}", err) from err
        origin = "passed as base_model" if base_model is not None else "named in adapter_config.json"
        raise BaseModelLoadError(
            f"Could not load the base model {name!r} ({origin}; safetensors weights, no remote code): "
            f"{type(err).__name__}: {err}. Pass base_model=... (a Hub id, a local folder or a loaded model)."
        ) from err
    return model.eval()


def from_pretrained(
    adapter_id: str | os.PathLike,
    *,
    revision: str | None = None,
    base_model: Any = None,
    dtype: Any = None,
    token: str | bool | None = None,
    **kwargs: Any,
) -> PeftModel:
    """Load a LiSA adapter (local folder or Hub repo) together with its base model -> `PeftModelForCausalLM`.

    base_model: None = `base_model_name_or_path` from the adapter config (the project's demo alias
        "smollm2-135m-instruct" resolves through `lisa_peft.base_models`); or a Hub id / folder; or a loaded model.
    dtype: dtype of the base model (e.g. torch.float16); default: transformers' default.
    kwargs: passed to `PeftModel.from_pretrained` (adapter_name, is_trainable, ...).

    Only safetensors weights are read (adapter and base), never pickle; no remote code runs.
    """
    from peft import PeftConfig, PeftModelForCausalLM

    from .tuners.lisa import LisaConfig

    if kwargs.pop("trust_remote_code", False):
        raise UnsafeAdapterFormatError("lisa_peft.from_pretrained never runs remote code (trust_remote_code=True).")
    if kwargs.pop("use_safetensors", True) is False:
        raise UnsafeAdapterFormatError("lisa_peft.from_pretrained loads safetensors only (use_safetensors=False).")
    folder = _fetch_adapter(adapter_id, revision, token)
    config = _with_registration(lambda: PeftConfig.from_pretrained(str(folder)))
    if not isinstance(config, LisaConfig):  # pragma: no cover - peft_type was checked on the raw JSON
        raise NotALisaAdapterError(f"{adapter_id} is a {config.peft_type} adapter, not a LiSA adapter.")
    base = _load_base_model(config, base_model, dtype, token)
    check_adapter_compatible(config, base)
    return _with_registration(
        lambda: PeftModelForCausalLM.from_pretrained(base, str(folder), config=config, **kwargs)
    )


# ---------------------------------------------------------------------------------------------- pushing
def _auth_hint(err: Exception) -> Exception:
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if isinstance(err, LocalTokenNotFoundError) or (
        isinstance(err, HfHubHTTPError) and getattr(err.response, "status_code", None) in (401, 403)
    ):
        return LisaAdapterError(
            f"The Hub at {_endpoint()} refused the upload ({err}). Pass token=... (CLI: --token), set HF_TOKEN, or "
            "run `hf auth login` with a token that has write access to the repo."
        )
    return err


def _upload(
    files: dict[str, bytes | str],
    repo_id: str,
    *,
    revision: str | None,
    private: bool | None,
    token: str | bool | None,
    commit_message: str,
    commit_description: str | None = None,
    create_pr: bool = False,
    create_repo: bool = True,
) -> Any:
    """Create the repo (and branch) if missing and commit `files` (path in repo -> bytes or local path)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    try:
        if create_repo:
            repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr") and not create_pr:
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()]
        return api.create_commit(
            repo_id, operations=operations, commit_message=commit_message, commit_description=commit_description,
            token=token, revision=revision, create_pr=create_pr,
        )
    except Exception as err:
        if _is_network_error(err):
            raise _network_error(f"uploading to {repo_id}", err) from err
        hinted = _auth_hint(err)
        if hinted is not err:
            raise hinted from err
        raise


def _remote_readme(repo_id: str, revision: str | None, token: str | bool | None) -> str | None:
    """README.md of the repo at `revision` (a branch not yet created: main's), or None."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError, RevisionNotFoundError

    for rev in dict.fromkeys([revision, None]):
        try:
            return Path(hf_hub_download(repo_id, README_NAME, revision=rev, token=token)).read_text(encoding="utf-8")
        except RevisionNotFoundError:
            continue
        except RemoteEntryNotFoundError:
            return None
        except LocalEntryNotFoundError as err:
            raise _network_error(f"reading the model card of {repo_id}", err) from err
    return None


def push_model_to_hub(
    model: PeftModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = None,
    tags: list[str] | None = None,
) -> Any:
    """`PeftModel.push_to_hub` for LiSA models: same arguments and result (a `CommitInfo`), LiSA model card.

    The repo's README.md becomes the LiSA card (see `lisa_peft.model_card.updated_card_text`: a hand-written
    card already in the repo is kept, with the LiSA tags added). Files at the root and adapter subfolders
    written by `save_pretrained` are uploaded in one commit; `revision` branches are created when missing.
    `max_shard_size` is accepted for signature compatibility (adapters are saved unsharded).
    """
    import tempfile

    from huggingface_hub import HfApi

    from .model_card import updated_card_text

    try:
        repo_id = HfApi().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    except Exception as err:
        if _is_network_error(err):
            raise _network_error(f"creating {repo_id}", err) from err
        hinted = _auth_hint(err)
        if hinted is not err:
            raise hinted from err
        raise
    existing = _remote_readme(repo_id, revision, token)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        card = updated_card_text(model, existing, repo_id=repo_id, tags=tags)
        Path(tmp, README_NAME).write_text(card, encoding="utf-8")
        files: dict[str, bytes | str] = {
            path.relative_to(tmp).as_posix(): str(path) for path in sorted(Path(tmp).rglob("*")) if path.is_file()
        }
        return _upload(
            files, repo_id, revision=revision, private=private, token=token,
            commit_message=commit_message or "Upload LiSA adapter", commit_description=commit_description,
            create_pr=create_pr, create_repo=False,
        )


def _card_for_folder(folder: Path, repo_id: str, token: str | bool | None) -> str:
    """The README.md to upload with the adapter in `folder` (rendered when the folder has none)."""
    from .model_card import fill_repo_id, render_model_card

    path = folder / README_NAME
    if path.is_file():
        return fill_repo_id(path.read_text(encoding="utf-8"), repo_id)
    from peft import PeftConfig
    from transformers import AutoConfig

    config = _with_registration(lambda: PeftConfig.from_pretrained(str(folder)))
    name = config.base_model_name_or_path
    try:
        if not name:
            raise ValueError("base_model_name_or_path is empty")
        base_config = AutoConfig.from_pretrained(_resolve_alias(name), token=token, trust_remote_code=False)
    except Exception as err:
        raise MissingAdapterFileError(
            f"{folder} has no {README_NAME}, and the config of its base model {name!r} could not be loaded to write "
            f"the LiSA model card ({type(err).__name__}: {err}). Save the adapter with model.save_pretrained(folder), "
            "which writes the card, or add a README.md."
        ) from err
    return render_model_card(config, base_config, repo_id=repo_id)


def push_adapter(
    adapter_dir: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a saved LiSA adapter (config, safetensors weights, model card) to `repo_id`; return the commit URL.

    Refuses a folder that is not a LiSA adapter, or that has only pickle weights. The repo is created when
    missing (`private` applies then; an existing repo keeps its visibility), and so is the `revision` branch.
    A README.md in the folder is uploaded as it is (a lisa-peft card gets the repo id in its usage snippet);
    without one, the LiSA card is rendered from the adapter config and the base model's config.
    """
    folder = Path(adapter_dir).expanduser()
    if not folder.is_dir():
        raise AdapterNotFoundError(f"{adapter_dir} is not a folder (expected a saved LiSA adapter).")
    _read_adapter_config(folder, str(adapter_dir))
    _check_local_weights(folder, str(adapter_dir))
    card = _card_for_folder(folder, repo_id, token)
    files: dict[str, bytes | str] = {
        CONFIG_NAME: str(folder / CONFIG_NAME),
        WEIGHTS_NAME: str(folder / WEIGHTS_NAME),
        README_NAME: card.encode("utf-8"),
    }
    info = _upload(
        files, repo_id, revision=revision, private=private, token=token,
        commit_message=commit_message or "Upload LiSA adapter",
    )
    return str(info.commit_url)
