"""Calibration text: where it comes from, and how it becomes fixed-length token windows."""

from __future__ import annotations

from pathlib import Path

import torch

from ..extras import require

__all__ = ["chunk_token_windows", "embedded_corpus", "load_texts", "split_texts", "spread_windows", "token_windows"]


def embedded_corpus() -> list[str]:
    """English prose shipped with Python itself: the help texts of ``pydoc_data.topics`` (79 topics, ~465k
    characters in CPython 3.11), sorted by topic name. Needs no file and no network."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions package pydoc_data separately
        raise RuntimeError(
            "The embedded calibration corpus needs Python's `pydoc_data` module, which this Python lacks; "
            "pass text files instead (e.g. `--text FILE`)."
        ) from err
    return [topics[name] for name in sorted(topics)]


def _load_hf_dataset(spec: str) -> list[str]:
    """``hf:NAME[:CONFIG][:SPLIT]`` -> the dataset's ``text`` column (or its first string column)."""
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"Expected hf:NAME[:CONFIG][:SPLIT], got {spec!r}")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    datasets = require("datasets", "data", f"The data source {spec!r} (or pass local .txt files instead)")
    ds = datasets.load_dataset(name, config, split=split)
    columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if not columns:
        raise ValueError(f"{spec!r} has no string column (columns: {list(ds.features)})")
    column = "text" if "text" in columns else columns[0]
    return [t for t in ds[column] if t and t.strip()]


def load_texts(sources: list[str] | None) -> list[str]:
    """Documents from `sources`: paths of UTF-8 text files, or ``hf:NAME[:CONFIG][:SPLIT]`` (a dataset loaded
    with ``datasets.load_dataset``, split ``train`` by default). None or empty -> `embedded_corpus()`."""
    if not sources:
        return embedded_corpus()
    texts: list[str] = []
    for source in sources:
        if source.startswith("hf:"):
            texts.extend(_load_hf_dataset(source))
            continue
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Calibration text file not found: {source}")
        texts.append(path.read_text(encoding="utf-8"))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"No text in {sources}")
    return texts


def _token_stream(tokenizer, texts: list[str]) -> list[int]:
    """All documents tokenized without special tokens, joined by eos (when the tokenizer has one)."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        if stream:
            stream.extend(sep)
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return stream


def token_windows(tokenizer, texts: list[str], seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """LongTensor [n, seq_len]: consecutive non-overlapping windows of the token stream (at most
    `max_sequences`, taken from the start). Raises ValueError when not even one window fits."""
    stream = _token_stream(tokenizer, texts)
    available = len(stream) // seq_len
    if available < 1:
        raise ValueError(f"The text has {len(stream)} tokens, fewer than one window of {seq_len}; give more text.")
    n = available if max_sequences is None else min(available, max_sequences)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def spread_windows(windows: torch.Tensor, n: int | None) -> torch.Tensor:
    """At most `n` of the windows [N, T], evenly spaced over all N (all of them when n is None or >= N)."""
    if n is None or windows.shape[0] <= n:
        return windows
    return windows[torch.arange(n) * windows.shape[0] // n]


def split_texts(texts: list[str], holdout: float = 0.1) -> tuple[list[str], list[str]]:
    """(first 1 - holdout, last holdout) of the concatenated documents, cut at a character position.

    The same convention as the project's benchmarks on tinyshakespeare (first 90% train, last 10%
    held out)."""
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    joined = "\n\n".join(texts)
    cut = int(len(joined) * (1 - holdout))
    return [joined[:cut]], [joined[cut:]]


def chunk_token_windows(tokenizer, texts: list[str], num_sequences: int, seq_len: int) -> torch.Tensor:
    """LongTensor [num_sequences, seq_len] of contiguous token windows, spread evenly over the corpus.

    The documents are tokenized without special tokens and joined with the eos token (when the tokenizer has
    one) into one stream, cut into non-overlapping windows of `seq_len`; `num_sequences` of them are taken at
    evenly spaced positions. Raises ValueError when the text is too short.
    """
    if num_sequences < 1 or seq_len < 1:
        raise ValueError(f"num_sequences and seq_len must be >= 1, got {num_sequences}, {seq_len}")
    stream = _token_stream(tokenizer, texts)
    available = len(stream) // seq_len
    if available < num_sequences:
        raise ValueError(
            f"The calibration text has {len(stream)} tokens, fewer than num_sequences x seq_len = "
            f"{num_sequences} x {seq_len}; give more text or ask for fewer/shorter sequences."
        )
    windows = torch.tensor(stream[: available * seq_len], dtype=torch.long).view(available, seq_len)
    return windows[torch.arange(num_sequences) * available // num_sequences]
