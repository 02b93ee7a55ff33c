"""The quantize job: load → estimate memory → calibrate (or load matrices) → fold → baselines → perplexity →
report.json. One function used by the CLI and the GUI runner; progress and cancellation go through core.progress.

Memory model (README "Memory model"): the model is loaded once, on the host, in its storage dtype. Calibration
modifies it in place, one layer at a time on the device. When the float original is kept for comparisons
(``keep_original``; None keeps it when it fits), the quantized model shares every tensor with it except the layers
it has changed, which are copied as they are reached (and the baselines are whole models: RTN shares the
original's weights, QuaRot's rotated weights are a copy). When it is not kept, the original's and the baselines'
perplexities are measured first, the baselines' layer-major (core.layer_major: one baseline layer at a time, no
second model), then the model is quantized in place."""
from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .algorithms import ALGORITHMS, apply_flat_structure, get_algorithm, rebuild_layer
from .algorithms.quarot import apply_quarot
from .calibrate import WEIGHT_ROUNDINGS, LayerResult, calibrate_model
from .config import FlatQuantConfig, load_config_file, normalize_skip_layers, parse_config
from .data import check_disjoint, recorded_source, sample_windows, token_ids, wikitext_test_path
from .device import COMPUTE_DTYPE_CHOICES, SUPPORTED_DEVICES, compute_dtype, dtype_name, resolve_device
from .distributed import DistInfo, finish, gather_to_main, init_distributed, layer_range
from .errors import ConfigError, FlatQuantError, JobCancelled, MatrixFileError, ModelLoadError
from .flat import fold_model
from .layer_major import layer_major_perplexity
from .matrices import (MATRIX_FILE, RESUME_FILE, apply_matrices, build_payload, read_complete_matrices,
                       read_matrices, save_matrices)
from .memory import (DTYPE_CHOICES, GIB, ActivationStore, ModelShape, activation_bytes, check_fits,
                     current_rss_bytes, device_peak_bytes, estimate_quantize_memory, host_available_bytes, parse_dtype)
from .models import (DEFAULT_MODEL, LoadedModel, checkpoint_dtype, decoder_layers, load_model, model_identity,
                     read_model_config, read_architecture, resolve_model_path, shared_copy)
from .options import GuiControl, described_fields, option
from .outputs import check_free_space
from .perplexity import perplexity_from_ids
from .progress import CancelToken, ProgressCallback, Reporter
from .report import update_report
from .validate import check_count, guarded_job, loss_warnings, validate_quantize_options

LOG_FILE = "quantize.log"


def _skip_layers_text(value) -> str:
    """skip_layers as the command line writes it (sorted, comma-separated); text it cannot parse stays as typed
    (the job refuses it with core.config's message)."""
    try:
        return ",".join(normalize_skip_layers(value))
    except ConfigError:
        return value if isinstance(value, str) else ",".join(map(str, value))


_SCALE = "memory and scale"
_ALGO = "algorithm"


@dataclass
class QuantizeOptions:
    """Every option of the quantize job. The field metadata (core.options) is the one source of the CLI's flags
    (core/commands/quantize.py) and of the GUI form (flatgui/settings.py, flatgui/form.py)."""
    model_path: Optional[str] = field(default=None, metadata=option(
        "local model folder, or 'smollm2' (default) for the embedded SmolLM2-135M-Instruct",
        gui=GuiControl("model", "dropdown", "model_path", info="model_path_info", default=DEFAULT_MODEL)))
    config: Optional[dict] = field(default=None, metadata=option(
        "AMCT-style config dict (None: INT4_FLAT_QUANT_CFG); the CLI gives --config FILE", internal=True))
    config_file: Optional[str] = field(default=None, metadata=option(
        "JSON/YAML config shaped like INT4_FLAT_QUANT_CFG", flag="--config"))
    skip_layers: Optional[list[str] | str] = field(default=None, metadata=option(
        "comma-separated names or name parts kept in full precision (substring match), e.g. "
        "lm_head,layers.0.mlp.down_proj; replaces the config's", config_key=True, canonical=_skip_layers_text,
        gui=GuiControl("skip", "text", "skip_layers", info="skip_layers_info", default="lm_head")))
    use_down_quant: Optional[bool] = field(default=None, metadata=option(
        "quantize down_proj (the config's use_down_quant, on by default)", flag="--use_down_quant",
        negation="--no_down_quant", negation_help="keep down_proj in full precision (for models sensitive to it)",
        config_key=True, gui=GuiControl("toggles", "checkbox", "use_down_quant", default=True)))
    use_o_quant: Optional[bool] = field(default=None, metadata=option(
        "quantize o_proj W4A4 with its own online transform (off by default)", negation="--no_use_o_quant",
        config_key=True,
        gui=GuiControl("toggles", "checkbox", "o_proj_quant", name="o_proj_quant", default=False)))
    use_kcache_quant: Optional[bool] = field(default=None, metadata=option(
        "fake-quantize the k cache (k_bits, default 4)", negation="--no_use_kcache_quant", config_key=True))
    use_vcache_quant: Optional[bool] = field(default=None, metadata=option(
        "fake-quantize the v cache (v_bits, default 4)", negation="--no_use_vcache_quant", config_key=True))
    load_matrix: bool = field(default=False, metadata=option("load --flat_matrix_path instead of calibrating"))
    flat_matrix_path: Optional[str] = field(default=None, metadata=option("flat_matrices.pth to load"))
    calib_data: Optional[str] = field(default=None, metadata=option(
        "calibration text: WikiText-2 raw file/folder, .txt, a datasets folder, or name[:config] in the local HF "
        "cache (default: Python's bundled documentation text)",
        gui=GuiControl("data", "text", "calib_data", info="calib_data_info", none_value="")))
    nsamples: int = field(default=128, metadata=option(
        "calibration windows (random, seeded by --seed)",
        gui=GuiControl("budget", "number", "nsamples", default=16, minimum=1)))
    seqlen: int = field(default=2048, metadata=option(
        "tokens per calibration window", gui=GuiControl("budget", "number", "seqlen", default=256, minimum=8)))
    epochs: Optional[int] = field(default=None, metadata=option(
        "default: the config's (15)", config_key=True,
        gui=GuiControl("budget", "number", "epochs", default=1, minimum=0)))
    cali_bsz: Optional[int] = field(default=None, metadata=option(
        "default: the config's (4)", config_key=True,
        gui=GuiControl("budget", "number", "cali_bsz", default=4, minimum=1)))
    flat_lr: Optional[float] = field(default=None, metadata=option(
        "default: the config's (5e-3)", config_key=True, gui=GuiControl("budget", "number", "flat_lr", default=5e-3)))
    device: str = field(default="auto", metadata=option(
        "auto: npu when torch_npu imports and a device exists, else cuda, else cpu", choices=lambda: SUPPORTED_DEVICES,
        gui=GuiControl("model", "dropdown", "device", info="device_info")))
    ppl_data: Optional[str] = field(default=None, metadata=option(
        "perplexity text: WikiText-2 raw file/folder or any text file (default: WikiText-2 test from "
        "../shared/data when present, else the held-out half of the embedded text)"))
    ppl_seqlen: int = field(default=512, metadata=option("perplexity window length"))
    ppl_max_windows: Optional[int] = field(default=None, metadata=option(
        "perplexity: at most N windows per seqlen (N >= 1; --no_ppl skips perplexity)"))
    skip_ppl: bool = field(default=False, metadata=option("skip the perplexity comparison", flag="--no_ppl"))
    skip_rtn: bool = field(default=False, metadata=option(
        "skip the baselines (--baselines) in perplexity and evaluation", flag="--no_rtn"))
    output_dir: str = field(default="outputs/smollm2", metadata=option(
        "default: ./outputs/<model name>", cli_default=None))
    max_layers: Optional[int] = field(default=None, metadata=option(
        "calibrate only the first N decoder layers (quick runs)",
        gui=GuiControl("quick", "number", "max_layers", none_value=0, minimum=0)))
    seed: int = field(default=0, metadata=option("seed of the calibration windows and of random rotations"))
    resume: bool = field(default=True, metadata=option("ignore a resume checkpoint", flag="--no_resume"))
    # memory and scale (issue 10)
    dtype: str = field(default="auto", metadata=option(
        "storage dtype of the loaded model (auto: the checkpoint's torch_dtype); the layer being calibrated is "
        "upcast to fp32 on the device", choices=lambda: DTYPE_CHOICES, group=_SCALE))
    activation_dir: Optional[str] = field(default=None, metadata=option(
        "keep the calibration set's captured activations in files in this folder, not in RAM", group=_SCALE))
    keep_original: Optional[bool] = field(default=None, metadata=option(
        "keep a float copy of the original for comparisons (API default: only when it fits)",
        negation="--no_keep_original",
        negation_help="quantize in place; the original and the baselines are evaluated first",
        group=_SCALE, cli_default=False))
    check_memory: bool = field(default=True, metadata=option(
        "start even when the memory estimate says the job will not fit", flag="--no_memory_check", group=_SCALE))
    algorithm: str = field(default="flatquant", metadata=option(
        "layer-wise algorithm", choices=lambda: sorted(ALGORITHMS), group=_ALGO,
        gui=GuiControl("algorithm", "dropdown", "algorithm", info="algorithm_info", choice_label="algo_{}")))
    distributed: bool = field(default=False, metadata=option(
        "layer-parallel calibration over torchrun ranks (torchrun --nproc_per_node N -m core quantize ... "
        "--distributed); rank 0 writes the files", group=_SCALE))
    compute_dtype: Optional[str] = field(default=None, metadata=option(
        "matmul dtype of calibration and evaluation (default auto: bf16 where native, i.e. AVX512-BF16/AMX CPUs "
        "and accelerators, else fp32)", choices=lambda: COMPUTE_DTYPE_CHOICES, group=_SCALE))
    weight_rounding: str = field(default="rtn", metadata=option(
        "rounding of the quantized weights after each layer is folded: rtn (the quantizer's) or gptq (on the "
        "Hessians of the transformed calibration inputs), under any --algorithm", choices=lambda: WEIGHT_ROUNDINGS,
        group=_ALGO, gui=GuiControl("algorithm", "dropdown", "weight_rounding", info="weight_rounding_info",
                                    choice_label="rounding_{}")))
    baselines: Optional[list[str] | str] = field(default="rtn", metadata=option(
        "baselines whose perplexity (and, with --eval, accuracy) the report also gives (default rtn; --no_rtn "
        "skips them all)", choices=lambda: list(BASELINES), multiple=True, group=_ALGO,
        gui=GuiControl("algorithm", "multiselect", "baselines", info="baselines_info", default=["rtn"],
                       choice_label="{}")))

    def baseline_names(self) -> list[str]:
        raw = self.baselines or []
        names = [n.strip() for n in (raw.split(",") if isinstance(raw, str) else raw) if n and n.strip()]
        return list(dict.fromkeys(names))

    def baselines_to_run(self) -> list[str]:
        """The baselines this job measures: --baselines, none with --no_rtn."""
        return [] if self.skip_rtn else self.baseline_names()

    def inputs(self, tasks_data_dir: Optional[str] = None) -> list[tuple[str, Optional[str]]]:
        """The paths this job reads, as (option, path): no output of the job may replace or clear one
        (core.outputs.check_apart)."""
        ppl = self.ppl_data
        if ppl is None and not self.skip_ppl:
            ppl = wikitext_test_path()
        return [("--model_path", resolve_model_path(self.model_path)),
                ("--flat_matrix_path", self.flat_matrix_path if self.load_matrix else None),
                ("--calib_data", None if self.load_matrix else self.calib_data), ("--ppl_data", ppl),
                ("--tasks_data_dir", tasks_data_dir), ("--activation_dir", self.activation_dir),
                ("--config", self.config_file)]

    def resolved_config(self) -> FlatQuantConfig:
        raw = self.config
        if raw is None and self.config_file:
            raw = load_config_file(self.config_file)
        cfg = parse_config(raw)
        if self.skip_layers is not None:
            cfg.skip_layers = normalize_skip_layers(self.skip_layers, "--skip_layers")
        for f, opt in described_fields(QuantizeOptions):
            value = getattr(self, f.name)
            if not opt.config_key or f.name == "skip_layers":
                continue
            if value is not None:
                setattr(cfg, f.name, value)
        if cfg.use_kcache_quant and cfg.k_bits >= 16:
            cfg.k_bits = 4  # turning the cache quant on without bits means the paper's 4-bit kv-cache
        if cfg.use_vcache_quant and cfg.v_bits >= 16:
            cfg.v_bits = 4
        return _validated(cfg)

    def check(self) -> None:
        for key, low in _COUNTS:
            check_count(f"--{key}", getattr(self, key), low)
        check_count("--ppl_max_windows", self.ppl_max_windows, 1, fix="; to skip perplexity pass --no_ppl")
        check_count("--seed", self.seed, 0, 2**64 - 1)
        if self.load_matrix and not self.flat_matrix_path:
            raise FlatQuantError("--load_matrix needs --flat_matrix_path FILE.")
        compute_dtype("cpu", self.compute_dtype)  # an unknown name is an error before anything runs
        parse_dtype(self.dtype)
        if self.algorithm not in ALGORITHMS:
            raise FlatQuantError(f"--algorithm must be one of {', '.join(sorted(ALGORITHMS))}, "
                                 f"got {self.algorithm!r}.")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise FlatQuantError(f"--weight_rounding must be one of {', '.join(WEIGHT_ROUNDINGS)}, "
                                 f"got {self.weight_rounding!r}.")
        unknown = [n for n in self.baseline_names() if n not in BASELINES]
        if unknown:
            raise FlatQuantError(f"--baselines must name some of {', '.join(BASELINES)}, got {', '.join(unknown)}.")


# the integer options and their least value (None: not given, the config's value)
_COUNTS = (("nsamples", 1), ("seqlen", 8), ("ppl_seqlen", 8), ("max_layers", 1), ("epochs", 0), ("cali_bsz", 1))


def _validated(cfg: FlatQuantConfig) -> FlatQuantConfig:
    """Re-run validation after CLI overrides so that e.g. --epochs -1 gets the same message as in a file."""
    parsed = parse_config(cfg.to_amct_dict())
    parsed.skip_layers = cfg.skip_layers
    return parsed


@dataclass
class QuantizeResult:
    report: dict
    original: LoadedModel  # untouched float model; its .model is None when it was not kept (memory policy)
    quantized: nn.Module  # fake-quant, folded (None on distributed ranks other than 0)
    rtn: Optional[nn.Module]  # shares the original's weights; None when not kept
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
    """The perplexity text's token ids and label: ``ppl_data``, else WikiText-2 test from the shared data folder,
    else the embedded text's second half."""
    wiki = wikitext_test_path() if ppl_data is None else None
    if wiki is not None:
        return token_ids(tokenizer, wiki, "test")[0], f"wikitext-2-raw test ({wiki})"
    return token_ids(tokenizer, ppl_data, "test")


def calibration_token_ids(tokenizer, options: QuantizeOptions) -> tuple[torch.Tensor, str]:
    """The calibration text's token ids and its label, never the text perplexity is measured on, now or later
    (also with --no_ppl): a source that is the perplexity text is refused (core.data.check_disjoint); the embedded
    default text gives its first half (perplexity reads the second half)."""
    check_disjoint(options.calib_data, options.ppl_data)
    return token_ids(tokenizer, options.calib_data, "train")


def _loaded_calibration(path: Path, meta: dict) -> dict:
    """report.json's calibration section for a loaded matrix file: where from, and what it was calibrated on as far
    as its meta records it (``calib_source`` lets a later perplexity refuse that text)."""
    recorded = {k: meta[k] for k in ("data", "calib_source") if k in meta}
    return {"loaded_from": str(path), "seconds": 0.0, **recorded}


def rtn_model(original: nn.Module, cfg: FlatQuantConfig, max_layers: Optional[int]) -> nn.Module:
    """The RTN W4A4 baseline: same modules, no transforms, no learned clipping. It shares the original's weight
    tensors (RTN quantizes in the forward and folding changes nothing), so it costs no second copy."""
    model = shared_copy(original)
    apply_flat_structure(model, cfg, num_layers=max_layers, use_transforms=False)
    fold_model(model)
    return model


def quarot_model(original: nn.Module, cfg: FlatQuantConfig, max_layers: Optional[int]) -> nn.Module:
    """The QuaRot-RTN W4A4 baseline (core.algorithms.quarot, default settings) as a whole model: its rotated
    weights are a whole copy of the model. The one remaining copy, where the baseline is needed as a model (the
    kept original's comparisons in the GUI, accuracy, evaluate); its perplexity in an in-place job is layer-major
    (core.layer_major), without the copy."""
    import copy

    model = copy.deepcopy(original)
    apply_quarot(model, cfg, num_layers=max_layers)
    fold_model(model)
    return model


# report.json's ppl key -> builder of the whole model from the float model; each key is also the name of the
# registered algorithm (core.algorithms, default settings) whose uncalibrated build it is (layer-major perplexity)
BASELINES = {"rtn": rtn_model, "quarot": quarot_model}


def _baseline_models(original: nn.Module, cfg: FlatQuantConfig, options: QuantizeOptions) -> dict:
    return {name: BASELINES[name](original, cfg, options.max_layers) for name in options.baselines_to_run()}


def _memory_plan(options: QuantizeOptions, cfg: FlatQuantConfig, device: torch.device, path: Path,
                 reporter: Reporter) -> tuple[torch.dtype, bool, dict]:
    """The storage dtype, whether the float original is kept, and the estimate (refusing a job that cannot fit)."""
    config = read_model_config(path)
    dtype = parse_dtype(options.dtype) or checkpoint_dtype(config)
    try:
        shape = ModelShape.from_config(config)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} lacks the sizes of the model ({exc}); pass a folder saved by "
                             "transformers' save_pretrained.") from exc
    calibrate = not options.load_matrix
    common = dict(weight_dtype=dtype, nsamples=options.nsamples, seqlen=options.seqlen, cali_bsz=cfg.cali_bsz,
                  device=device, activations_on_disk=bool(options.activation_dir), calibrate=calibrate,
                  ppl_seqlen=options.ppl_seqlen, layers_trained=options.max_layers)
    available = host_available_bytes()
    resident = current_rss_bytes()
    keep = options.keep_original
    if keep is None:
        with_copy = estimate_quantize_memory(shape, keep_original=True, **common)
        keep = available is None or with_copy.host_total <= 0.85 * (available + resident)
    est = estimate_quantize_memory(shape, keep_original=keep, **common)
    host, on_device = est.parts_gib()
    params = {"host_gib": est.host_total / GIB, "host_parts": host}
    if keep:
        reporter.emit("memory_estimate", params)
    else:
        reporter.emit("memory_estimate_in_place", params)
    if not est.device_is_host:
        reporter.emit("memory_estimate_device", {"device": str(device), "device_gib": est.device_total / GIB,
                                                 "device_parts": on_device})
    if options.check_memory:
        knobs = []
        if dtype == torch.float32:
            knobs.append("--dtype bf16")
        if calibrate and not options.activation_dir:
            knobs.append("--activation_dir DIR")
        if calibrate:
            knobs.append("--nsamples (now %d)" % options.nsamples)
        if keep:
            knobs.append("--no_rtn/--no_keep_original")
        check_fits(est, device, knobs or ["--max_layers"], available, already_resident=resident)
        if calibrate and options.activation_dir:
            check_free_space(options.activation_dir, activation_bytes(shape, options.nsamples, options.seqlen),
                             "--activation_dir", "the calibration activations (2 x nsamples x seqlen x hidden fp32)",
                             "free space there, point --activation_dir at a bigger disk, or lower --nsamples")
    return dtype, keep, est.to_dict()


def _evaluate_ppl(models: dict, ids: torch.Tensor, options: QuantizeOptions, device: torch.device,
                  reporter: Reporter, ppl: dict, out_dir: Path, report: dict) -> None:
    for name, model in models.items():
        if model is None:
            continue
        value = perplexity_from_ids(model, ids, options.ppl_seqlen, max_windows=options.ppl_max_windows,
                                    reporter=reporter, label=name, device=device, dtype=options.compute_dtype or "auto")
        _record_ppl(name, value, reporter, ppl, out_dir, report)


def _record_ppl(name: str, value: float, reporter: Reporter, ppl: dict, out_dir: Path, report: dict) -> None:
    ppl[name] = value
    reporter.emit("ppl_value", {"model": name, "value": value})
    update_report(out_dir, dict(report, ppl=dict(ppl)))  # a cancel during the next model keeps this number


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
    dist_info = DistInfo()
    if options.distributed:
        dist_info, device = init_distributed(device)
        reporter.emit("distributed", {"rank": dist_info.rank, "world": dist_info.world, "backend": dist_info.backend})
    reporter.device = device
    matrix_path = out_dir / MATRIX_FILE
    resume_path = out_dir / RESUME_FILE
    t_start = time.monotonic()

    path = resolve_model_path(options.model_path)
    read_architecture(path)  # an unsupported model is refused before anything is estimated or loaded
    if dist_info.world > 1:  # ranks quantize in place; rank 0 reports quantized PPL only
        options = replace(options, keep_original=False)
    dtype, keep_original, estimate = _memory_plan(options, cfg, device, path, reporter)
    reporter.emit("load_model", {"model_path": options.model_path or "smollm2", "dtype": dtype_name(dtype),
                                 "device": str(device)})
    original = load_model(options.model_path, device="cpu", dtype=dtype)
    reporter.check()
    model = original.model
    ppl: dict = {}
    ids = None
    want_ppl = not options.skip_ppl and dist_info.is_main
    want_baselines = want_ppl and not options.skip_rtn
    if want_ppl:
        ids, ppl_label = ppl_token_ids(original.tokenizer, options.ppl_data)
        ppl.update({"dataset": ppl_label, "seqlen": options.ppl_seqlen, "max_windows": options.ppl_max_windows})
    baselines: dict = {}
    if keep_original:
        quantized = shared_copy(model)  # shares every tensor until calibration copies the layer it changes
        if want_baselines:
            baselines = _baseline_models(model, cfg, options)
    else:
        quantized = model
        if want_ppl:  # the float model and the baselines (one at a time) before the weights change
            section = _model_section(original, cfg)
            _evaluate_ppl({"original": model}, ids, options, device, reporter, ppl, out_dir, section)
            for name in options.baselines_to_run():  # layer-major: one baseline layer at a time, no model copy
                value = layer_major_perplexity(model, get_algorithm(name, cfg), ids, options.ppl_seqlen,
                                               max_windows=options.ppl_max_windows, num_layers=options.max_layers,
                                               reporter=reporter, label=name, device=device,
                                               dtype=options.compute_dtype or "auto")
                _record_ppl(name, value, reporter, ppl, out_dir, section)
    rtn = baselines.get("rtn")
    calib: dict = {"nsamples": options.nsamples, "seqlen": options.seqlen, "epochs": cfg.epochs,
                   "cali_bsz": cfg.cali_bsz, "flat_lr": cfg.flat_lr, "device": str(device),
                   "algorithm": options.algorithm, "weight_rounding": options.weight_rounding,
                   "dtype": str(dtype).replace("torch.", ""),
                   "keep_original": keep_original, "activation_dir": options.activation_dir,
                   "memory_estimate": estimate}
    if options.load_matrix:
        reporter.emit("load_matrices", {"file_path": str(options.flat_matrix_path)})
        matrix_path = Path(options.flat_matrix_path)
        payload = read_complete_matrices(matrix_path)
        cfg = apply_matrices(quantized, payload, str(matrix_path), copy_layers=keep_original)
        calib = _loaded_calibration(matrix_path, payload.get("meta") or {})
    else:
        calib_ids, data_label = calibration_token_ids(original.tokenizer, options)
        reporter.emit("calib_data", {"source": data_label})
        samples = sample_windows(calib_ids, options.nsamples, options.seqlen, options.seed)
        algo = get_algorithm(options.algorithm, cfg)
        run_key = {"nsamples": options.nsamples, "seqlen": options.seqlen, "data": data_label, "seed": options.seed,
                   "max_layers": options.max_layers}
        if options.algorithm != "flatquant":
            run_key["algorithm"] = options.algorithm
        if algo.settings():
            run_key["algorithm_settings"] = algo.settings()
        if options.weight_rounding != "rtn":
            run_key["weight_rounding"] = options.weight_rounding
        use_resume = options.resume and dist_info.world == 1
        done_states = _resume_states(resume_path, quantized, cfg, run_key, reporter) if use_resume else {}
        layer_states: dict[int, dict] = dict(done_states)
        layer_results: list[LayerResult] = []

        def on_layer_done(i: int, state: dict, result: LayerResult) -> None:
            layer_states[i] = state
            layer_results.append(result)
            if use_resume:
                save_matrices(resume_path, build_payload(quantized, cfg, layer_states, complete=False, extra=run_key))

        num = len(decoder_layers(quantized))
        num = num if options.max_layers is None else min(num, options.max_layers)
        rng = layer_range(num, dist_info.rank, dist_info.world) if dist_info.world > 1 else None
        store = ActivationStore(options.activation_dir)
        t0 = time.monotonic()
        try:
            calibrate_model(quantized, samples, cfg, device, reporter, dtype=options.compute_dtype or "auto",
                            max_layers=options.max_layers,
                            done_states=done_states, on_layer_done=on_layer_done, algorithm=algo, layer_range=rng,
                            store=store, copy_layers=keep_original, weight_rounding=options.weight_rounding)
        except JobCancelled:
            resume_path.unlink(missing_ok=True)  # a cancel leaves nothing half-done behind
            logger.info("[cancel] calibration cancelled; no matrix file written")
            raise
        finally:
            store.close()
        seconds = time.monotonic() - t0
        if dist_info.world > 1:
            gathered = gather_to_main(({i: s for i, s in layer_states.items()},
                                       [_layer_record(r) for r in layer_results]), dist_info)
            if not dist_info.is_main:
                finish(dist_info)
                return QuantizeResult({}, LoadedModel(None, original.tokenizer, original.name, original.path,
                                                      original.architecture), None, None, original.tokenizer,
                                      out_dir, matrix_path, cfg, {"rank": dist_info.rank})
            records = []
            for rank_states, rank_records in gathered:
                for i, state in rank_states.items():
                    if i not in layer_states:  # another rank's layer: rebuild it here from its state
                        rebuild_layer(algo, decoder_layers(quantized)[i], i, state)
                        layer_states[i] = state
                records.extend(rank_records)
            finish(dist_info)
        else:
            records = [_layer_record(r) for r in layer_results]
        # calib_source: a later perplexity (evaluate, the GUI's Compare) refuses the text calibrated on
        meta = dict(run_key, seconds=seconds, calib_source=recorded_source(options.calib_data))
        save_matrices(matrix_path, build_payload(quantized, cfg, layer_states, complete=True, extra=meta))
        resume_path.unlink(missing_ok=True)
        reporter.emit("saved", {"file_path": str(matrix_path)})
        calib.update({"seconds": round(seconds, 2), "data": data_label, "calib_source": meta["calib_source"],
                      "max_layers": options.max_layers,
                      "world_size": dist_info.world, "warnings": loss_warnings(layer_results),
                      "layers": sorted(records, key=lambda r: r["layer"])})
    calib["peak_rss_mb"] = round(peak_rss_mb(), 1)
    calib["compute_dtype"] = dtype_name(compute_dtype(device, options.compute_dtype))
    dev_peak = device_peak_bytes(device)
    if dev_peak is not None:
        calib["device_peak_mb"] = round(dev_peak / 2 ** 20, 1)  # torch max_memory_allocated

    report = {
        **_model_section(original, cfg, quantized),
        "calibration": calib,
        "artifacts": {"flat_matrices": str(matrix_path), "log": str(out_dir / LOG_FILE)},
    }
    if want_ppl:
        models = {"original": model, "quantized": quantized, **baselines} if keep_original else {"quantized": quantized}
        _evaluate_ppl(models, ids, options, device, reporter, ppl, out_dir, report)
        report["ppl"] = {k: ppl[k] for k in ("original", "quantized", *BASELINES, "dataset", "seqlen", "max_windows")
                         if k in ppl}
    report["calibration"]["peak_rss_mb"] = round(peak_rss_mb(), 1)
    report["total_seconds"] = round(time.monotonic() - t_start, 2)
    report = update_report(out_dir, report)
    if device.type != "cpu":
        _place_on_device([model, quantized, *baselines.values()] if keep_original else [quantized], device, reporter)
    if not keep_original:
        original = LoadedModel(None, original.tokenizer, original.name, original.path, original.architecture)
    reporter.emit("report_written", {"file_path": str(out_dir / "report.json")})
    return QuantizeResult(report, original, quantized, rtn, original.tokenizer, out_dir, matrix_path, cfg,
                          {"keep_original": keep_original, "baselines": baselines})


def _model_section(original: LoadedModel, cfg: FlatQuantConfig, model: Optional[nn.Module] = None) -> dict:
    """report.json's model and config sections."""
    return {"model": {"name": original.name, "path": original.path, **model_identity(model or original.model)},
            "config": cfg.to_amct_dict()}


def _layer_record(r: LayerResult) -> dict:
    return {"layer": r.index, "first_loss": r.first_loss, "last_loss": r.last_loss, "epoch_losses": r.losses,
            "seconds": round(r.seconds, 3)}


def _place_on_device(models: list, device: torch.device, reporter: Reporter) -> None:
    """Move the result models to the device when all of them fit there (as before, for the GUI's comparisons);
    otherwise they stay on the host and evaluation streams their layers."""
    from .memory import device_free_bytes

    models = [m for m in models if m is not None]
    need = sum(t.numel() * t.element_size() for t in {id(t): t for m in models for t in
                                                       list(m.parameters()) + list(m.buffers())}.values())
    free = device_free_bytes(device)
    if free is not None and need < 0.8 * free:
        for m in models:
            m.to(device)
        reporter.emit("models_on_device", {"device": str(device), "gib": need / GIB})
    else:
        reporter.emit("models_on_host", {"device": str(device), "gib": need / GIB})


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
        reporter.emit("resuming", {"n": len(states), "file_path": str(path)})
    return states
