"""Calibration/perplexity text sources."""
import pytest
import torch

from core.data import EMBEDDED_TEXT_LABEL, load_text, sample_windows, tokenize
from core.errors import DataError


def test_embedded_default_is_real_text_from_python():
    text, label = load_text(None)
    assert label == EMBEDDED_TEXT_LABEL and len(text) > 100_000 and "the" in text


def test_wikitext_raw_file_and_folder(shared_data):
    raw = shared_data / "wikitext-2-raw" / "wiki.test.raw"
    text, _ = load_text(raw)
    assert text.startswith(" = Robert Boulter = \n\n\n Robert Boulter is")  # rows joined with "\n\n" (WikiText-2 way)
    folder_text, _ = load_text(raw.parent, split="test")
    assert folder_text == text


def test_txt_and_datasets_folder(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma")
    assert load_text(tmp_path / "a.txt")[0] == "alpha beta gamma"
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"text": ["first line", "second line"]})}).save_to_disk(tmp_path / "ds")
    assert load_text(tmp_path / "ds")[0] == "first line\n\nsecond line"


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no wiki"):
        load_text(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("   \n")
    with pytest.raises(DataError, match="no text"):
        load_text(tmp_path / "blank.txt")
    with pytest.raises(DataError, match="local HF cache"):
        load_text("some_dataset_not_in_cache")


def test_sample_windows_are_seeded_and_checked():
    ids = torch.arange(1000)
    a, b = sample_windows(ids, 4, 64, seed=1), sample_windows(ids, 4, 64, seed=1)
    assert a.shape == (4, 64) and torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 63, dtype=torch.long))  # contiguous windows
    with pytest.raises(DataError, match="--seqlen"):
        sample_windows(ids[:10], 1, 64)


def test_folder_never_falls_back_to_another_split(shared_data, tmp_path):
    raw = shared_data / "wikitext-2-raw"
    with pytest.raises(DataError, match="no wiki.train.raw"):
        load_text(raw)  # calibration (split train) must not silently read the test split
    (tmp_path / "wiki.test.raw").write_text(" = A = \n text \n")
    (tmp_path / "notes.txt").write_text("other words")
    with pytest.raises(DataError, match="wiki.valid.tokens"):
        load_text(tmp_path)  # nor through the folder-of-text-files branch


def test_wikitext_validation_tokens_file(shared_data):
    text, _ = load_text(shared_data / "wikitext-2" / "wiki.valid.tokens")
    assert text.startswith(" \n\n\n = Homarus gammarus = \n") and "<unk>" in text  # rows joined as for .raw
    assert load_text(shared_data / "wikitext-2", split="valid")[0] == text


def test_calibration_and_perplexity_text_must_differ(shared_data, tmp_path):
    from core.data import check_disjoint

    test = shared_data / "wikitext-2-raw" / "wiki.test.raw"
    valid = shared_data / "wikitext-2" / "wiki.valid.tokens"
    assert check_disjoint(valid, test) is None
    assert check_disjoint(valid, None) is None  # None: the default perplexity text (WikiText-2 test)
    for calib, ppl in ((test, test), (test, None), (test.parent / ".." / "wikitext-2-raw" / "wiki.test.raw", test),
                       (test, test.parent)):
        with pytest.raises(DataError, match="same text"):
            check_disjoint(calib, ppl)
    note = check_disjoint(test, test, split_explicitly=True)
    assert "disjoint parts" in note
    (tmp_path / "a.txt").write_text("x")
    assert check_disjoint(tmp_path / "a.txt", test) is None
    with pytest.raises(DataError, match="Python's bundled documentation"):
        check_disjoint(None, "embedded")


def test_quantize_on_the_embedded_text_calibrates_on_its_first_half_only(tiny_qwen3_dir, tmp_path, monkeypatch):
    """No ../shared/data: perplexity reads the embedded text's second half, so calibration reads only the first half,
    and report.json says so."""
    from core.models import load_model
    from core.pipeline import QuantizeOptions, calibration_token_ids, ppl_token_ids, run_quantize

    monkeypatch.setattr("core.pipeline.wikitext_test_path", lambda: None)
    monkeypatch.setattr("core.data.wikitext_test_path", lambda: None)
    tokenizer = load_model(str(tiny_qwen3_dir)).tokenizer
    options = QuantizeOptions(model_path=str(tiny_qwen3_dir), algorithm="rtn", nsamples=2, seqlen=32,
                              ppl_max_windows=1, output_dir=str(tmp_path / "run"))
    calib, label = calibration_token_ids(tokenizer, options, want_ppl=True)
    test, _ = ppl_token_ids(tokenizer, None)
    assert "first half" in label and calib.numel() + test.numel() == len(tokenize(tokenizer, load_text(None)[0]))
    report = run_quantize(options).report
    assert "first half" in report["calibration"]["data"] and "second half" in report["ppl"]["dataset"]
    skip_ppl = QuantizeOptions(model_path=str(tiny_qwen3_dir), skip_ppl=True)
    assert calibration_token_ids(tokenizer, skip_ppl, want_ppl=False)[0].numel() == calib.numel() + test.numel()


def test_quantize_refuses_to_calibrate_on_the_perplexity_text_before_loading(tiny_qwen3_dir, tmp_path, monkeypatch):
    from core.pipeline import QuantizeOptions, run_quantize

    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the data sources were checked")

    monkeypatch.setattr("core.pipeline.load_model", refuse)
    same = tmp_path / "same.txt"
    same.write_text("some text " * 500)
    with pytest.raises(DataError, match="same text"):
        run_quantize(QuantizeOptions(model_path=str(tiny_qwen3_dir), calib_data=str(same), ppl_data=str(same),
                                     output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_benchmark_data_reads_disjoint_wikitext_splits(smollm2, tmp_path, monkeypatch):
    """bench/'s data: calibration windows from WikiText-2 validation, perplexity ids of the whole test split; a data
    folder without them is refused with a message naming the files."""
    from core.data import benchmark_data, shared_data_dir

    data = benchmark_data(smollm2.tokenizer, nsamples=3, seqlen=16)
    assert data.calib_file.name == "wiki.valid.tokens" and data.test_file.name == "wiki.test.raw"
    assert data.samples.shape == (3, 16) and data.test_ids.numel() > 100_000
    valid = tokenize(smollm2.tokenizer, data.calib_file.read_text(encoding="utf-8"))
    assert bool((valid.unfold(0, 16, 1) == data.samples[0]).all(1).any())  # drawn from the validation text
    monkeypatch.setenv("FLATQUANT_DATA_DIR", str(tmp_path))
    assert shared_data_dir() == tmp_path
    with pytest.raises(DataError, match="wiki.valid.tokens"):
        benchmark_data(smollm2.tokenizer, nsamples=3, seqlen=16)
