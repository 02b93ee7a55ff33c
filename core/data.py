"""Text sources for calibration and perplexity: WikiText-2 raw files/folders, any .txt, datasets saved to disk, a
dataset in the local HF cache, and an embedded default that ships with Python itself."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from .errors import DataError

EMBEDDED_TEXT_LABEL = "Python's bundled documentation text (pydoc_data.topics, ships with CPython)"
_REPO = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Optional[Path]:
    """FLATQUANT_DATA_DIR, else ../shared/data beside the checkout (tests, CI, benchmarks)."""
    env = os.environ.get("FLATQUANT_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(_REPO.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def wikitext_test_path() -> Optional[Path]:
    d = shared_data_dir()
    p = d / "wikitext-2-raw" / "wiki.test.raw" if d else None
    return p if p is not None and p.is_file() else None


def embedded_text() -> str:
    """Real English prose available on any machine with Python: the reference text behind help()."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _wikitext_join(raw: str) -> str:
    # The WikiText-2 evaluation convention: "\n\n".join(dataset rows), one row per line of the raw file.
    return "\n\n".join(raw.splitlines(keepends=True))


def _read_file(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"Cannot read {str(path)!r}: {exc.strerror}.") from exc
    if path.suffix == ".jsonl":
        import json

        rows = []
        for number, line in enumerate(raw.splitlines(), 1):
            line = line.strip()
            if line:
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{path.name} line {number} is not JSON ({str(exc).splitlines()[0]}); give one "
                                    "JSON object with a 'text' field per line, or a .txt file.") from exc
                rows.append(obj.get("text", "") if isinstance(obj, dict) else str(obj))
        return "\n\n".join(rows)
    return _wikitext_join(raw) if path.suffix == ".raw" else raw


def _from_datasets_obj(ds, split: str) -> str:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:
            split = next(iter(ds))
        ds = ds[split]
    if "text" not in ds.column_names:
        raise DataError(f"The dataset has no 'text' column (columns: {ds.column_names}).")
    return "\n\n".join(ds["text"])


def load_text(source: Optional[str | os.PathLike], split: str = "train") -> tuple[str, str]:
    """Return (text, label). ``source`` is a file, a folder (WikiText-2 raw, a datasets save_to_disk folder, or .txt
    files), or 'name[:config]' of a dataset in the local HF cache. None gives the embedded default."""
    if source is None or str(source) in ("", "default", "embedded"):
        return embedded_text(), EMBEDDED_TEXT_LABEL
    path = Path(source).expanduser()
    if path.is_file():
        text = _read_file(path)
    elif path.is_dir():
        wiki = [path / f"wiki.{split}.raw", path / "wiki.train.raw", path / "wiki.test.raw"]
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            from datasets import load_from_disk

            text = _from_datasets_obj(load_from_disk(str(path)), split)
        elif any(p.is_file() for p in wiki):
            text = _read_file(next(p for p in wiki if p.is_file()))
        else:
            files = sorted(list(path.glob("*.txt")) + list(path.glob("*.raw")))
            if not files:
                raise DataError(f"Folder {str(path)!r} has no wiki.*.raw, .txt or saved dataset to read.")
            text = "\n\n".join(_read_file(f) for f in files)
    elif "/" not in str(source) or not str(source).startswith((".", "/", "~")):
        name, _, config = str(source).partition(":")
        try:
            from datasets import load_dataset

            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            text = _from_datasets_obj(load_dataset(name, config or None, split=split), split)
        except Exception as exc:
            raise DataError(f"Data source {str(source)!r} is neither a local file/folder nor a dataset in the local HF "
                            f"cache ({type(exc).__name__}); give a path to a .txt or WikiText-2 raw file.") from exc
    else:
        raise DataError(f"Data path {str(source)!r} does not exist.")
    if not text.strip():
        raise DataError(f"Data source {str(source)!r} contains no text.")
    return text, str(source)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of token ids for a long text (no special tokens, no truncation)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, truncation=False, verbose=False).input_ids
    return ids[0]


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """nsamples random windows of seqlen tokens (seeded), shape [nsamples, seqlen]."""
    if ids.numel() < seqlen + 1:
        raise DataError(f"Calibration text has {ids.numel()} tokens, fewer than --seqlen {seqlen}; "
                        "give more text or a smaller --seqlen.")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
