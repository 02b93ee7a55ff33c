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


def test_saved_dataset_without_the_split_is_refused_naming_its_splits(tmp_path):
    """A DatasetDict without the split asked for (perplexity reads 'test') never falls back to another split, which
    may be the calibration text; a plain Dataset has no splits, so calibration and perplexity on it overlap."""
    from datasets import Dataset, DatasetDict

    from core.data import check_disjoint

    splits = DatasetDict({"train": Dataset.from_dict({"text": ["calibration row"]}),
                          "validation": Dataset.from_dict({"text": ["validation row"]})})
    splits.save_to_disk(tmp_path / "ds")
    with pytest.raises(DataError, match="no 'test' split \\(it has: train, validation\\)") as err:
        load_text(tmp_path / "ds", split="test")
    assert "\n" not in str(err.value)
    assert load_text(tmp_path / "ds", split="validation")[0] == "validation row"
    assert check_disjoint(tmp_path / "ds", tmp_path / "ds") is None  # train vs test: separate splits
    Dataset.from_dict({"text": ["one text"]}).save_to_disk(tmp_path / "plain")
    with pytest.raises(DataError, match="same text"):
        check_disjoint(tmp_path / "plain", tmp_path / "plain")


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
    (tmp_path / "a.txt").write_text("x")
    assert check_disjoint(tmp_path / "a.txt", test) is None
    assert check_disjoint(None, "embedded") is None  # the embedded text's halves: calibration first, perplexity second


def _no_shared_wikitext(monkeypatch) -> None:
    """The default perplexity text becomes the embedded text's second half, as on a machine without ../shared."""
    monkeypatch.setattr("core.pipeline.wikitext_test_path", lambda: None)
    monkeypatch.setattr("core.data.wikitext_test_path", lambda: None)


def test_embedded_text_calibrates_on_its_first_half_whatever_the_ppl_options(tiny_qwen3_dir, tmp_path,
                                                                            monkeypatch):
    """Calibration on the embedded text reads its first half, also with --no_ppl or another --ppl_data; every
    perplexity read of it (the default, --ppl_data embedded, a later evaluate or the GUI's Compare) the second."""
    from core.models import load_model
    from core.pipeline import QuantizeOptions, calibration_token_ids, ppl_token_ids

    _no_shared_wikitext(monkeypatch)
    tokenizer = load_model(str(tiny_qwen3_dir)).tokenizer
    whole = tokenize(tokenizer, load_text(None)[0])
    (tmp_path / "other.txt").write_text("other words " * 100)
    for ppl_options in ({}, {"skip_ppl": True}, {"ppl_data": str(tmp_path / "other.txt")},
                        {"ppl_data": str(tmp_path / "other.txt"), "skip_ppl": True}):
        calib, label = calibration_token_ids(tokenizer, QuantizeOptions(**ppl_options))
        assert "first half" in label and torch.equal(calib, whole[:whole.numel() // 2]), ppl_options
    for ppl_data in (None, "embedded"):
        held_out, label = ppl_token_ids(tokenizer, ppl_data)
        assert "second half" in label and torch.equal(held_out, whole[whole.numel() // 2:])


def test_quantize_without_ppl_records_the_calibration_text_and_evaluate_refuses_it(tiny_qwen3_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    """--no_ppl (GUI: PPL windows = 0) on the embedded text: report and matrix file say the first half was
    calibrated on, and a later perplexity of the second half runs; a run calibrated on a file records it, and a
    later evaluate (CLI, GUI Compare) or --load_matrix on that file is refused before any model loads."""
    from core.cli import main
    from core.evaluate import EvalOptions, evaluate_pair
    from core.matrices import calibrated_on, read_matrices
    from core.pipeline import QuantizeOptions, run_quantize

    _no_shared_wikitext(monkeypatch)
    run = run_quantize(QuantizeOptions(model_path=str(tiny_qwen3_dir), algorithm="rtn", nsamples=2, seqlen=32,
                                       skip_ppl=True, output_dir=str(tmp_path / "embedded")))
    assert "first half" in run.report["calibration"]["data"] and run.report["calibration"]["calib_source"] == "embedded"
    assert calibrated_on(read_matrices(run.matrix_path)) == "embedded"
    compare = EvalOptions(sections=("ppl",), output_dir=str(tmp_path / "embedded"), ppl_seqlens=(16,),
                          ppl_max_windows=1, ppl_rtn=False)  # what the GUI's Compare tab asks for
    ppl = evaluate_pair(run.original.model, run.quantized, run.tokenizer, compare)["ppl"]
    assert "second half" in ppl["dataset"] and ppl["quantized"] > 1

    text = tmp_path / "notes.txt"
    text.write_text("calibration words and more words " * 300)
    run = run_quantize(QuantizeOptions(model_path=str(tiny_qwen3_dir), algorithm="rtn", nsamples=2, seqlen=32,
                                       calib_data=str(text), skip_ppl=True, output_dir=str(tmp_path / "file")))
    assert run.report["calibration"]["calib_source"] == str(text.resolve())
    with pytest.raises(DataError, match="same text"):  # the GUI's Compare: the run's report names the text
        evaluate_pair(run.original.model, run.quantized, run.tokenizer,
                      EvalOptions(sections=("ppl",), output_dir=str(tmp_path / "file"), ppl_data=str(text)))
    monkeypatch.setattr("core.pipeline.load_model", lambda *_a, **_k: pytest.fail("loaded before the data check"))
    rc = main(["evaluate", "--model_path", str(tiny_qwen3_dir), "--flat_matrix_path", str(run.matrix_path),
               "--eval", "ppl", "--ppl_data", str(text), "--output_dir", str(tmp_path / "eval")])
    assert rc == 2 and "same text" in capsys.readouterr().err
    with pytest.raises(DataError, match="same text"):
        run_quantize(QuantizeOptions(model_path=str(tiny_qwen3_dir), load_matrix=True, ppl_data=str(text),
                                     flat_matrix_path=str(run.matrix_path), output_dir=str(tmp_path / "load")))


def test_no_ppl_still_refuses_to_calibrate_on_the_default_perplexity_text(tiny_qwen3_dir, tmp_path, monkeypatch):
    """With --no_ppl the job measures nothing, but evaluate and the GUI's Compare later read the default perplexity
    text (WikiText-2 test when present): calibrating on it is refused as well, before the model loads."""
    from core.pipeline import QuantizeOptions, run_quantize

    test_split = tmp_path / "wiki.test.raw"
    test_split.write_text(" = A = \n some test text \n" * 200)
    monkeypatch.setattr("core.data.wikitext_test_path", lambda: test_split)
    monkeypatch.setattr("core.pipeline.load_model", lambda *_a, **_k: pytest.fail("loaded before the data check"))
    with pytest.raises(DataError, match="same text.*--no_ppl"):
        run_quantize(QuantizeOptions(model_path=str(tiny_qwen3_dir), calib_data=str(test_split), skip_ppl=True,
                                     output_dir=str(tmp_path / "run")))


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


def test_benchmark_data_reads_disjoint_wikitext_splits(smollm2, shared_data, tmp_path, monkeypatch):
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
