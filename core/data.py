"""Text sources for calibration and perplexity: WikiText-2 raw files/folders, any .txt, datasets saved to disk, a
dataset in the local HF cache, and an embedded default that ships with Python itself."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .errors import DataError

EMBEDDED_TEXT_LABEL = "Python's bundled documentation text (pydoc_data.topics, ships with CPython)"
# The embedded text is split in two by tokens (token_ids): calibration (split "train") reads the first half, every
# other reader (perplexity: split "test") the second, so the two never overlap, whatever the options.
_EMBEDDED_HALVES = {"train": "first half (perplexity reads the second half)", "other": "second half"}
_EMBEDDED_NAMES = ("", "default", "embedded")
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


def is_embedded(source: Optional[str | os.PathLike]) -> bool:
    return source is None or str(source) in _EMBEDDED_NAMES


def _embedded_label(split: str) -> str:
    return f"{EMBEDDED_TEXT_LABEL}, {_EMBEDDED_HALVES['train' if split == 'train' else 'other']}"


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
    return _wikitext_join(raw) if path.suffix in (".raw", ".tokens") else raw


_WIKI_SUFFIXES = (".raw", ".tokens")


def _wiki_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("wiki.*") if p.suffix in _WIKI_SUFFIXES and p.is_file())


def _wiki_split_file(folder: Path, split: str) -> Optional[Path]:
    """wiki.<split>.raw / wiki.<split>.tokens in a WikiText-2 folder. Never another split: calibrating on the test
    split by accident would measure memorisation, not quality."""
    for suffix in _WIKI_SUFFIXES:
        p = folder / f"wiki.{split}{suffix}"
        if p.is_file():
            return p
    found = _wiki_files(folder)
    if found:
        raise DataError(f"Folder {str(folder)!r} has no wiki.{split}.raw (only {', '.join(p.name for p in found)}); "
                        f"give the file to use explicitly, e.g. --calib_data ../shared/data/wikitext-2/wiki.valid.tokens "
                        "for calibration when perplexity is measured on wiki.test.raw.")
    return None


def _is_saved_dataset(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _text_files(folder: Path) -> list[Path]:
    return sorted(list(folder.glob("*.txt")) + list(folder.glob("*.raw")))


def _from_datasets_obj(ds, split: str, source: str) -> str:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:  # never another split: it may be the text the other side of the job reads
            raise DataError(f"Dataset {source!r} has no {split!r} split (it has: {', '.join(ds)}); calibration reads "
                            "the 'train' split and perplexity the 'test' split: save the text under that name, or "
                            "give a .txt file.")
        ds = ds[split]
    if "text" not in ds.column_names:
        raise DataError(f"The dataset has no 'text' column (columns: {ds.column_names}).")
    return "\n\n".join(ds["text"])


def load_text(source: Optional[str | os.PathLike], split: str = "train") -> tuple[str, str]:
    """Return (text, label). ``source`` is a file, a folder (WikiText-2 raw, a datasets save_to_disk folder, or .txt
    files), or 'name[:config]' of a dataset in the local HF cache. None gives the embedded default, whole (token_ids
    gives the half a calibration or a perplexity reads)."""
    if is_embedded(source):
        return embedded_text(), EMBEDDED_TEXT_LABEL
    path = Path(source).expanduser()
    if path.is_file():
        text = _read_file(path)
    elif path.is_dir():
        if _is_saved_dataset(path):
            from datasets import load_from_disk

            text = _from_datasets_obj(load_from_disk(str(path)), split, str(source))
        elif (wiki := _wiki_split_file(path, split)) is not None:
            text = _read_file(wiki)
        else:
            files = _text_files(path)
            if not files:
                raise DataError(f"Folder {str(path)!r} has no wiki.*.raw, .txt or saved dataset to read.")
            text = "\n\n".join(_read_file(f) for f in files)
    elif "/" not in str(source) or not str(source).startswith((".", "/", "~")):
        name, _, config = str(source).partition(":")
        try:
            from datasets import load_dataset

            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            text = _from_datasets_obj(load_dataset(name, config or None, split=split), split, str(source))
        except Exception as exc:
            raise DataError(f"Data source {str(source)!r} is neither a local file/folder nor a dataset in the local HF "
                            f"cache ({type(exc).__name__}); give a path to a .txt or WikiText-2 raw file.") from exc
    else:
        raise DataError(f"Data path {str(source)!r} does not exist.")
    if not text.strip():
        raise DataError(f"Data source {str(source)!r} contains no text.")
    return text, str(source)


def _text_parts(source: Optional[str | os.PathLike], split: str) -> frozenset[str]:
    """What load_text(source, split) reads (token_ids for the embedded text), as names two reads can be compared by:
    the embedded text's half, resolved files, a saved dataset folder with its split (a plain Dataset has none), or a
    cached dataset's name and split."""
    if is_embedded(source):
        return frozenset({_embedded_label(split)})
    path = Path(source).expanduser()
    if path.is_file():
        return frozenset({str(path.resolve())})
    if not path.is_dir():
        return frozenset({f"{source} [{split}]"})
    if _is_saved_dataset(path):
        splits = (path / "dataset_dict.json").exists()  # a plain Dataset has no splits: every read is the same text
        return frozenset({f"{path.resolve()} [{split}]" if splits else str(path.resolve())})
    wiki = _wiki_split_file(path, split)
    return frozenset(str(f.resolve()) for f in ([wiki] if wiki is not None else _text_files(path)))


def recorded_source(source: Optional[str | os.PathLike]) -> str:
    """A calibration source as the matrix file's meta and report.json record it (``calib_source``), so that a later
    perplexity run can refuse the text the model was calibrated on: "embedded", a local path made absolute, or a
    dataset name."""
    if is_embedded(source):
        return "embedded"
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def check_disjoint(calib_source: Optional[str | os.PathLike], ppl_source: Optional[str | os.PathLike]) -> None:
    """Refuse (DataError) when calibration and perplexity read the same text: the perplexity would then reward
    memorising the calibration windows. ``ppl_source`` None means the default perplexity text (WikiText-2 test when
    present, else the embedded text's second half), which a later ``evaluate`` or the GUI's Compare tab reads even
    when the quantize job measures no perplexity."""
    if ppl_source is None:
        ppl_source = wikitext_test_path()
    shared = _text_parts(calib_source, "train") & _text_parts(ppl_source, "test")
    if shared:
        raise DataError(f"Calibration data and perplexity data are the same text ({', '.join(sorted(shared))}); "
                        "calibrate on other text (e.g. --calib_data ../shared/data/wikitext-2/wiki.valid.tokens when "
                        "perplexity is measured on wiki.test.raw) or give a different --ppl_data (also with --no_ppl: "
                        "`evaluate` and the GUI's Compare tab read the default perplexity text later).")


def check_recorded_disjoint(recorded: Optional[str], ppl_source: Optional[str | os.PathLike]) -> None:
    """check_disjoint for a model calibrated earlier, from the ``calib_source`` its matrix file or report recorded
    (recorded_source); None (a file from before it was recorded) has nothing to compare."""
    if recorded is not None:
        check_disjoint(recorded, ppl_source)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of token ids for a long text (no special tokens, no truncation)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, truncation=False, verbose=False).input_ids
    return ids[0]


def token_ids(tokenizer, source: Optional[str | os.PathLike], split: str = "train") -> tuple[torch.Tensor, str]:
    """(token ids, label) of load_text(source, split); of the embedded text only the half that ``split`` reads:
    the first for calibration ("train"), the second otherwise (perplexity)."""
    text, label = load_text(source, split)
    ids = tokenize(tokenizer, text)
    if not is_embedded(source):
        return ids, label
    half = ids.numel() // 2
    return (ids[:half] if split == "train" else ids[half:]), _embedded_label(split)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """nsamples random windows of seqlen tokens (seeded), shape [nsamples, seqlen]."""
    if ids.numel() < seqlen + 1:
        raise DataError(f"Calibration text has {ids.numel()} tokens, fewer than --seqlen {seqlen}; "
                        "give more text or a smaller --seqlen.")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


@dataclass
class BenchmarkData:
    """The benchmarks' text (bench/): calibration windows from WikiText-2 validation, perplexity ids of the whole
    WikiText-2 test split; the two files are checked to be different texts."""

    calib_file: Path
    test_file: Path
    samples: torch.Tensor  # [nsamples, seqlen] from calib_file
    test_ids: torch.Tensor  # 1-D, the whole of test_file


def benchmark_data(tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> BenchmarkData:
    """WikiText-2 validation (``wikitext-2/wiki.valid.tokens``) for calibration and test (``wikitext-2-raw/
    wiki.test.raw``) for perplexity, from the shared data folder (FLATQUANT_DATA_DIR or ../shared/data)."""
    folder = shared_data_dir()
    calib_file = folder / "wikitext-2" / "wiki.valid.tokens" if folder else None
    test_file = folder / "wikitext-2-raw" / "wiki.test.raw" if folder else None
    if calib_file is None or not calib_file.is_file() or not test_file.is_file():
        raise DataError("The benchmarks need ../shared/data (or FLATQUANT_DATA_DIR) with wikitext-2/wiki.valid.tokens "
                        "and wikitext-2-raw/wiki.test.raw.")
    check_disjoint(calib_file, test_file)
    samples = sample_windows(tokenize(tokenizer, load_text(calib_file)[0]), nsamples, seqlen, seed)
    return BenchmarkData(calib_file, test_file, samples, tokenize(tokenizer, load_text(test_file)[0]))
