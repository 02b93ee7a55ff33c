"""The quantize job: load → calibrate (or load matrices) → fold → baselines → perplexity → report.json.
One function used by the CLI and the GUI runner; progress and cancellation go through core.progress."""
from __future__ import annotations

import copy
import logging
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .calibrate import LayerResult, calibrate_model
from .config import FlatQuantConfig, load_config_file, normalize_skip_layers, parse_config
from .data import EMBEDDED_TEXT_LABEL, load_text, sample_windows, tokenize, wikitext_test_path
from .device import compute_dtype, dtype_name, resolve_device
from .errors import FlatQuantError, JobCancelled, MatrixFileError
from .flat import apply_flat_structure, fold_model
from .matrices import MATRIX_FILE, RESUME_FILE, build_payload, load_matrices, read_matrices, save_matrices
from .models import LoadedModel, load_model, model_identity
from .perplexity import perplexity_from_ids
from .progress import CancelToken, ProgressCallback, Reporter
from .report import update_report
from .validate import guarded_job, loss_warnings, validate_quantize_options

LOG_FILE = "quantize.log"


@dataclass
class QuantizeOptions:
    model_path: Optional[str] = None  # None or "smollm2": the embedded default model
    config: Optional[dict] = None  # AMCT-style dict; None: INT4_FLAT_QUANT_CFG
    config_file: Optional[str] = None
    skip_layers: Optional[list[str] | str] = None  # replaces the config's skip_layers when given
    use_down_quant: Optional[bool] = None
    use_o_quant: Optional[bool] = None
    use_kcache_quant: Optional[bool] = None
    use_vcache_quant: Optional[bool] = None
    load_matrix: bool = False
    flat_matrix_path: Optional[str] = None
    calib_data: Optional[str] = None  # None: embedded text (see core.data)
    nsamples: int = 128
    seqlen: int = 2048
    epochs: Optional[int] = None
    cali_bsz: Optional[int] = None
    flat_lr: Optional[float] = None
    device: str = "auto"
    ppl_data: Optional[str] = None  # None: WikiText-2 test from ../shared/data when present, else embedded text
    ppl_seqlen: int = 512
    ppl_max_windows: Optional[int] = None
    skip_ppl: bool = False
    skip_rtn: bool = False
    output_dir: str = "outputs/smollm2"
    max_layers: Optional[int] = None  # calibrate only the first N decoder layers (quick runs)
    seed: int = 0
    resume: bool = True
    compute_dtype: Optional[str] = None  # auto | bf16 | fp16 | fp32 (core.device.compute_dtype); None = auto

    def resolved_config(self) -> FlatQuantConfig:
        raw = self.config
        if raw is None and self.config_file:
            raw = load_config_file(self.config_file)
        cfg = parse_config(raw)
        if self.skip_layers is not None:
            cfg.skip_layers = normalize_skip_layers(self.skip_layers, "--skip_layers")
        for key in ("use_down_quant", "use_o_quant", "use_kcache_quant", "use_vcache_quant", "epochs", "cali_bsz",
                    "flat_lr"):
            value = getattr(self, key)
            if value is not None:
                setattr(cfg, key, value)
        if cfg.use_kcache_quant and cfg.k_bits >= 16:
            cfg.k_bits = 4  # turning the cache quant on without bits means the paper's 4-bit kv-cache
        if cfg.use_vcache_quant and cfg.v_bits >= 16:
            cfg.v_bits = 4
        return _validated(cfg)

    def check(self) -> None:
        for key, low in (("nsamples", 1), ("seqlen", 8), ("ppl_seqlen", 8)):
            if getattr(self, key) < low:
                raise FlatQuantError(f"--{key} must be >= {low}, got {getattr(self, key)}.")
        if self.load_matrix and not self.flat_matrix_path:
            raise FlatQuantError("--load_matrix needs --flat_matrix_path FILE.")
        compute_dtype("cpu", self.compute_dtype)  # an unknown name is an error before anything runs
        if self.max_layers is not None and self.max_layers < 1:
            raise FlatQuantError(f"--max_layers must be >= 1, got {self.max_layers}.")


def _validated(cfg: FlatQuantConfig) -> FlatQuantConfig:
    """Re-run validation after CLI overrides so that e.g. --epochs -1 gets the same message as in a file."""
    parsed = parse_config(cfg.to_amct_dict())
    parsed.skip_layers = cfg.skip_layers
    return parsed


@dataclass
class QuantizeResult:
    report: dict
    original: LoadedModel  # untouched float model
    quantized: nn.Module  # fake-quant, folded
    rtn: Optional[nn.Module]
    tokenizer: object
    output_dir: Path
    matrix_path: Path
    config: FlatQuantConfig
    extras: dict = field(default_factory=dict)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _file_logger(output_dir: Path) -> logging.Logger:
    logger = logging.getLogger(f"flatquant.run.{output_dir.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    path = str(output_dir / LOG_FILE)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(path) for h in logger.handlers):
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    return logger


def ppl_token_ids(tokenizer, ppl_data: Optional[str]) -> tuple[torch.Tensor, str]:
    if ppl_data is None:
        wiki = wikitext_test_path()
        if wiki is not None:
            text, _ = load_text(wiki)
            return tokenize(tokenizer, text), f"wikitext-2-raw test ({wiki})"
        text, _ = load_text(None)
        ids = tokenize(tokenizer, text)
        return ids[ids.numel() // 2:], f"{EMBEDDED_TEXT_LABEL}, second half"
    text, label = load_text(ppl_data, split="test")
    return tokenize(tokenizer, text), label


def rtn_model(original: nn.Module, cfg: FlatQuantConfig, max_layers: Optional[int]) -> nn.Module:
    """The RTN W4A4 baseline: same modules, no transforms, no learned clipping."""
    model = copy.deepcopy(original)
    apply_flat_structure(model, cfg, num_layers=max_layers, use_transforms=False)
    fold_model(model)
    return model


@guarded_job(kept_name=RESUME_FILE)
def run_quantize(options: QuantizeOptions, on_event: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None) -> QuantizeResult:
    cfg = validate_quantize_options(options)
    out_dir = Path(options.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = _file_logger(out_dir)

    def log_event(event):
        # per-step lines go to the callback only; the log keeps the first and last step of each epoch
        if event.stage != "calibrate" or event.step in (0, (event.steps or 1) - 1):
            logger.info("[%s] %s", event.stage, event.message)
        if on_event is not None:
            on_event(event)

    reporter = Reporter(log_event, cancel)
    device = resolve_device(options.device)
    matrix_path = out_dir / MATRIX_FILE
    resume_path = out_dir / RESUME_FILE
    t_start = time.monotonic()

    reporter.emit("load", f"loading model {options.model_path or 'smollm2 (embedded default)'} on {device}")
    original = load_model(options.model_path, device=device)
    reporter.check()
    quantized = copy.deepcopy(original.model)
    calib: dict = {"nsamples": options.nsamples, "seqlen": options.seqlen, "epochs": cfg.epochs,
                   "cali_bsz": cfg.cali_bsz, "flat_lr": cfg.flat_lr, "device": str(device)}
    if options.load_matrix:
        reporter.emit("load", f"loading calibrated matrices from {options.flat_matrix_path}")
        loaded_cfg = load_matrices(options.flat_matrix_path, quantized)
        cfg = loaded_cfg
        matrix_path = Path(options.flat_matrix_path)
        calib = {"loaded_from": str(matrix_path), "seconds": 0.0}
    else:
        text, data_label = load_text(options.calib_data)
        reporter.emit("data", f"calibration data: {data_label}")
        samples = sample_windows(tokenize(original.tokenizer, text), options.nsamples, options.seqlen, options.seed)
        run_key = {"nsamples": options.nsamples, "seqlen": options.seqlen, "data": data_label, "seed": options.seed,
                   "max_layers": options.max_layers}
        done_states = _resume_states(resume_path, quantized, cfg, run_key, reporter) if options.resume else {}
        layer_states: dict[int, dict] = dict(done_states)
        layer_results: list[LayerResult] = []

        def on_layer_done(i: int, state: dict, result: LayerResult) -> None:
            layer_states[i] = state
            layer_results.append(result)
            save_matrices(resume_path, build_payload(quantized, cfg, layer_states, complete=False, extra=run_key))

        t0 = time.monotonic()
        try:
            calibrate_model(quantized, samples, cfg, device, reporter, dtype=options.compute_dtype or "auto",
                            max_layers=options.max_layers,
                            done_states=done_states, on_layer_done=on_layer_done)
        except JobCancelled:
            resume_path.unlink(missing_ok=True)  # a cancel leaves nothing half-done behind
            logger.info("[cancel] calibration cancelled; no matrix file written")
            raise
        seconds = time.monotonic() - t0
        meta = dict(run_key, seconds=seconds)
        save_matrices(matrix_path, build_payload(quantized, cfg, layer_states, complete=True, extra=meta))
        resume_path.unlink(missing_ok=True)
        reporter.emit("fold", f"saved {matrix_path}")
        calib.update({"seconds": round(seconds, 2), "data": data_label, "max_layers": options.max_layers,
                      "warnings": loss_warnings(layer_results),
                      "layers": [{"layer": r.index, "first_loss": r.first_loss, "last_loss": r.last_loss,
                                  "epoch_losses": r.losses, "seconds": round(r.seconds, 3)} for r in layer_results]})
    calib["peak_rss_mb"] = round(peak_rss_mb(), 1)
    calib["compute_dtype"] = dtype_name(compute_dtype(device, options.compute_dtype))

    rtn = None if (options.skip_rtn or options.skip_ppl) else rtn_model(original.model, cfg, options.max_layers)
    report = {
        "model": {"name": original.name, "path": original.path, **model_identity(original.model)},
        "config": cfg.to_amct_dict(),
        "calibration": calib,
        "artifacts": {"flat_matrices": str(matrix_path), "log": str(out_dir / LOG_FILE)},
    }
    if not options.skip_ppl:
        ids, ppl_label = ppl_token_ids(original.tokenizer, options.ppl_data)
        ppl = {"dataset": ppl_label, "seqlen": options.ppl_seqlen, "max_windows": options.ppl_max_windows}
        for name, model in (("original", original.model), ("quantized", quantized), ("rtn", rtn)):
            if model is None:
                continue
            ppl[name] = perplexity_from_ids(model, ids, options.ppl_seqlen, max_windows=options.ppl_max_windows,
                                            reporter=reporter, label=name, dtype=options.compute_dtype or "auto")
            reporter.emit("ppl", f"PPL {name}: {ppl[name]:.3f}")
            update_report(out_dir, dict(report, ppl=ppl))  # a cancel during the next model keeps this number
        report["ppl"] = ppl
    report["calibration"]["peak_rss_mb"] = round(peak_rss_mb(), 1)
    report["total_seconds"] = round(time.monotonic() - t_start, 2)
    report = update_report(out_dir, report)
    reporter.emit("done", f"report written to {out_dir / 'report.json'}")
    return QuantizeResult(report, original, quantized, rtn, original.tokenizer, out_dir, matrix_path, cfg)


def _resume_states(path: Path, model: nn.Module, cfg: FlatQuantConfig, run_key: dict, reporter: Reporter) -> dict:
    """Layers finished by an interrupted run with the same model, config and data; {} when there is nothing to
    resume or the checkpoint does not match (it is then ignored and overwritten)."""
    if not path.exists():
        return {}
    try:
        payload = read_matrices(path)
    except MatrixFileError:
        return {}
    if (payload.get("identity") != model_identity(model) or payload.get("config") != cfg.to_amct_dict()
            or payload.get("meta") != run_key):
        return {}
    states = {int(i): s for i, s in payload["layers"].items()}
    if states:
        reporter.emit("load", f"resuming: {len(states)} layer(s) restored from {path}")
    return states
