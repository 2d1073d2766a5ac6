"""Errors of pushing and loading LiSA adapters, and the translation of Hub / PEFT errors into them.

Every error says what went wrong and what to do. `translate_hub_errors` turns huggingface_hub's errors
into these classes; `with_registration` repairs (or explains) a PEFT that does not know LISA.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from .. import registration
from ..registration import PEFT_TYPE_NAME

T = TypeVar("T")

UNREGISTERED_HINT = (
    "PEFT does not know the LISA method in this process: run `import lisa_peft` before loading a LiSA adapter "
    "(it registers LISA with PEFT). Every process that loads the adapter needs the import, including worker "
    "processes started with multiprocessing 'spawn', DataLoader workers, torchrun / accelerate ranks and serving "
    "processes; `lisa_peft.from_pretrained(...)` does it for you."
)


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


class InvalidAdapterConfigError(NotALisaAdapterError, json.JSONDecodeError):
    """adapter_config.json is not valid JSON (still a `json.JSONDecodeError` for code that catches PEFT's error,
    and a `NotALisaAdapterError` as `lisa_peft.from_pretrained` raised before)."""

    def __init__(self, message: str, err: json.JSONDecodeError) -> None:
        json.JSONDecodeError.__init__(self, message, err.doc, err.pos)


class LisaNotRegisteredError(RuntimeError):
    """PEFT does not know the LISA method in this process (see `UNREGISTERED_HINT`)."""


def endpoint() -> str:
    """The Hub endpoint in use (`HF_ENDPOINT`)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_network_error(err: BaseException) -> bool:
    """True for connection failures, timeouts and "offline without a cached copy"."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & {"TransportError", "ConnectError", "TimeoutException", "NetworkError"})


def network_error(what: str, err: BaseException) -> HubUnreachableError:
    """A `HubUnreachableError` for `what` with the retry / offline hint."""
    from huggingface_hub import constants

    return HubUnreachableError(
        f"Could not reach the Hub at {endpoint()} for {what} ({type(err).__name__}: {err}). Check the network "
        "connection (and HTTPS_PROXY) and retry. HF_ENDPOINT selects the Hub endpoint (for a mirror); with "
        f"HF_HUB_OFFLINE=1 files already in the local cache ({constants.HF_HUB_CACHE}) are used without a network."
    )


def auth_error(err: Exception) -> Exception:
    """A `LisaAdapterError` explaining tokens for a refused upload; `err` itself for any other error."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if isinstance(err, LocalTokenNotFoundError) or (
        isinstance(err, HfHubHTTPError) and getattr(err.response, "status_code", None) in (401, 403)
    ):
        return LisaAdapterError(
            f"The Hub at {endpoint()} refused the upload ({err}). Pass token=... (CLI: --token), set HF_TOKEN, or "
            "run `hf auth login` with a token that has write access to the repo."
        )
    return err


def is_unregistered_error(err: BaseException) -> bool:
    """True if `err` is PEFT's way of saying that it does not know the LISA method."""
    if isinstance(err, KeyError):
        return bool(err.args) and str(err.args[0]) in (PEFT_TYPE_NAME, f"PeftType.{PEFT_TYPE_NAME}")
    return f"'{PEFT_TYPE_NAME}' is not a valid PeftType" in str(err)


def with_registration(call: Callable[[], T]) -> T:
    """Run a PEFT call; if PEFT does not know LISA, register it again and retry once, else explain."""
    try:
        return call()
    except (KeyError, ValueError) as err:
        if not is_unregistered_error(err):
            raise
        registration.register_lisa()
        try:
            return call()
        except (KeyError, ValueError) as again:
            if is_unregistered_error(again):
                raise LisaNotRegisteredError(f"{type(again).__name__}: {again}. {UNREGISTERED_HINT}") from again
            raise


@contextmanager
def translate_hub_errors(source: str, revision: str | None, what: str) -> Iterator[None]:
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
        raise network_error(what, err) from err
    except RevisionNotFoundError as err:
        raise AdapterNotFoundError(f"Revision {revision!r} does not exist in the Hub repo {source}.") from err
    except RepositoryNotFoundError as err:
        raise AdapterNotFoundError(
            f"{source} is neither a local folder nor a Hub repo at {endpoint()} that this token can read: it does not "
            "exist, or it is private/gated. Check the name; for a private repo pass token=... or set HF_TOKEN / run "
            "`hf auth login`."
        ) from err
    except EntryNotFoundError:
        raise  # a file missing in the repo: the caller names it
    except HFValidationError as err:
        raise AdapterNotFoundError(f"{source} is neither a local folder nor a valid Hub repo id ({err}).") from err
    except Exception as err:
        if is_network_error(err):
            raise network_error(what, err) from err
        raise
