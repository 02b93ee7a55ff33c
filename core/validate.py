"""Checks that run before a model loads, after each trained layer, and around a job's writes.

Everything here turns a bad input or a failed write into one FlatQuantError line that says what to fix, so a user
never waits for a model to load (or a calibration to run) only to learn the input was wrong, and an early error
leaves no output folder behind.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Optional

from .config import FlatQuantConfig, parse_config
from .data import check_disjoint, check_recorded_disjoint
from .device import resolve_device
from .errors import CalibrationError, ConfigError, DataError, MatrixFileError, ModelLoadError, OutputError, shown
from .events import render as render_event
from .matrices import calibrated_on, non_finite_tensors, read_matrices
from .models import LAYER_LINEARS, check_model_weights, identity_of, model_layer_names, read_model_folder
from .outputs import check_output_dir, check_writable_folder, close_file_logs, remove_if_only_logs
from .report import REPORT_NAME, atomic_write_bytes, load_report

# A layer whose loss ends more than this factor above where it started is reported (log, report.json, GUI).
LOSS_RISE_TOLERANCE = 1.0
# Always a failed write; the others (permissions, a file in the way) only when they name a file in the output folder.
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_WRITE_ERRNOS = _FULL_ERRNOS | {errno.EACCES, errno.EPERM, errno.EIO, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}
# Files a job writes into its output folder that may be removed when the job fails before writing anything else.
# The config.json sizes a job reads (memory estimate, matrix shapes, seqlen limit): required, then optional ones.
# --- option values -------------------------------------------------------------------------------------------


def check_count(option: str, value, minimum: int = 1, maximum: Optional[int] = None, fix: str = "") -> None:
    """An integer option (a count, a length, a seed) is within [minimum, maximum]; None means not given. ``fix``
    follows the message (e.g. the option to use instead)."""
    if value is None:
        return
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not (is_int and minimum <= value and (maximum is None or value <= maximum)):
        bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ConfigError(f"{option} must be an integer {bounds}, got {shown(value)}{fix}.")


def quantized_layer_names(model_cfg: dict, cfg: FlatQuantConfig, max_layers: Optional[int]) -> list[str]:
    """The linears this config would quantize (the first max_layers decoder layers)."""
    n = int(model_cfg.get("num_hidden_layers") or 0)
    n = n if max_layers is None else min(n, max_layers)
    parts = [p for p in LAYER_LINEARS if (p != "self_attn.o_proj" or cfg.use_o_quant)
             and (p != "mlp.down_proj" or cfg.use_down_quant)]
    return [name for i in range(n) for p in parts if not cfg.is_skipped(name := f"model.layers.{i}.{p}")]


def check_skip_layers(model_cfg: dict, cfg: FlatQuantConfig, max_layers: Optional[int]) -> None:
    names = model_layer_names(model_cfg)
    for entry in cfg.skip_layers:
        if not any(entry == name or entry in name for name in names):
            raise ConfigError(f"skip_layers entry {entry!r} matches no layer of this model (names look like "
                              f"'model.layers.0.mlp.down_proj', 'lm_head'; the model has "
                              f"{model_cfg.get('num_hidden_layers')} decoder layers).")
    if not quantized_layer_names(model_cfg, cfg, max_layers):
        raise ConfigError(f"skip_layers {cfg.skip_layers} skips every layer, so nothing would be quantized; "
                          "name only the layers to keep in full precision, e.g. 'lm_head,layers.0.mlp.down_proj'.")


def check_seqlen(model_cfg: dict, value: int, option: str) -> None:
    limit = model_cfg.get("max_position_embeddings")
    if isinstance(limit, int) and value > limit:
        raise ConfigError(f"{option} {value} is longer than the model's context ({limit} positions, "
                          f"max_position_embeddings); use {option} {limit} or less.")


def check_ppl_seqlens(model_cfg: dict, seqlens, option: str = "--ppl_seqlens") -> None:
    """At least one perplexity window fits the model's context (a longer one is reported n/a, as undefined); when
    none does, the perplexity section would measure nothing."""
    limit = model_cfg.get("max_position_embeddings")
    if isinstance(limit, int) and seqlens and min(seqlens) > limit:
        raise ConfigError(f"{option} {' '.join(str(s) for s in seqlens)}: every window is longer than the model's "
                          f"context ({limit} positions, max_position_embeddings), so nothing would be measured; use "
                          f"{option} {limit} or less.")


def config_identity(model_cfg: dict) -> dict:
    """model_identity() computed from config.json, so a matrix file is matched before the model loads."""
    archs = model_cfg.get("architectures") or [model_cfg.get("model_type", "unknown")]
    try:
        return identity_of(archs[0], SimpleNamespace(**model_cfg))
    except (AttributeError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"The model's config.json lacks a valid size field ({exc}); restore the file saved by "
                             "transformers.") from exc


# --- matrix files -------------------------------------------------------------------------------------------


def check_matrix_file(path: str | os.PathLike, model_cfg: Optional[dict] = None, need_complete: bool = True) -> dict:
    """Read a matrix file and check it is complete, finite and (given config.json) made for this model."""
    payload = read_matrices(path)  # also refuses non-finite tensors
    name = Path(path).name
    if need_complete and not payload.get("complete", True):
        raise MatrixFileError(f"Matrix file {name!r} is a partial (resume) checkpoint; finish the calibration with "
                              "the same --output_dir first.")
    if model_cfg is not None:
        want, have = payload["identity"], config_identity(model_cfg)
        diff = {k: (want.get(k), v) for k, v in have.items() if want.get(k) != v}
        if diff:
            details = ", ".join(f"{k}: file {a} vs model {b}" for k, (a, b) in diff.items())
            raise MatrixFileError(f"Matrix file {name!r} was calibrated for another model ({details}); load it "
                                  "with the model it was made for, or recalibrate.")
    return payload


# --- data and output folders --------------------------------------------------------------------------------


def check_data_source(source: Optional[str], option: str) -> None:
    """A path-like data source must exist (a bare name may be a dataset in the local HF cache)."""
    if source is None or str(source) in ("", "default", "embedded"):
        return
    path = Path(source).expanduser()
    if not path.exists() and (str(source).startswith((".", "/", "~")) or path.suffix in (".txt", ".raw", ".jsonl")):
        raise DataError(f"{option} {str(source)!r} does not exist; give a .txt or WikiText-2 raw file or folder.")


def estimated_matrix_bytes(model_cfg: dict, max_layers: Optional[int] = None, weight_rounding: str = "rtn") -> int:
    """Upper bound of a flat_matrices.pth for this model (fp32 transforms, inverses, diag and clip vectors; with
    GPTQ rounding also an int8 code per linear weight and fp32 row scales)."""
    hidden = int(model_cfg.get("hidden_size") or 0)
    inter = int(model_cfg.get("intermediate_size") or 0)
    heads = int(model_cfg.get("num_attention_heads") or 1)
    head_dim = int(model_cfg.get("head_dim") or hidden // max(1, heads))
    kv = int(model_cfg.get("num_key_value_heads") or heads)
    layers = int(model_cfg.get("num_hidden_layers") or 0)
    layers = layers if max_layers is None else min(layers, max_layers)
    per_layer = 4 * (10 * hidden + 8 * inter + (heads + 2 * kv) * head_dim)
    if weight_rounding == "gptq":
        q_out = (heads + 2 * kv) * head_dim
        per_layer += hidden * (q_out + heads * head_dim + 3 * inter) + 4 * (q_out + hidden * 2 + 2 * inter)
    return layers * per_layer * 2 + 64 * 1024


# --- the quantize job ---------------------------------------------------------------------------------------


def validate_quantize_options(options) -> FlatQuantConfig:
    """Every check on a QuantizeOptions that needs no loaded model; returns the resolved config."""
    options.check()
    cfg = options.resolved_config()
    resolve_device(options.device)
    model_dir, model_cfg = read_model_folder(options.model_path)
    check_seqlen(model_cfg, options.seqlen, "--seqlen")
    if not options.skip_ppl:
        check_seqlen(model_cfg, options.ppl_seqlen, "--ppl_seqlen")
    check_model_weights(model_dir, model_cfg)
    if options.load_matrix:
        payload = check_matrix_file(options.flat_matrix_path, model_cfg)
        cfg = _parse_payload_config(payload, options.flat_matrix_path)
        if not options.skip_ppl:  # never measure perplexity on the text the matrices were calibrated on
            check_recorded_disjoint(calibrated_on(payload), options.ppl_data)
    else:
        check_data_source(options.calib_data, "--calib_data")
        if options.activation_dir:  # its free space is checked with the memory estimate (core.pipeline)
            check_writable_folder(options.activation_dir, "--activation_dir")
        # never calibrate on a perplexity text, this job's or (also with --no_ppl) a later evaluate's or Compare
        # tab's; the embedded text's halves are disjoint (calibration reads the first, perplexity the second)
        check_disjoint(options.calib_data, options.ppl_data)
    check_skip_layers(model_cfg, cfg, None if options.load_matrix else options.max_layers)
    if not options.skip_ppl:
        check_data_source(options.ppl_data, "--ppl_data")
    # The resume file, the final file and a temp copy of each may coexist; report and log are small.
    check_output_dir(options.output_dir, 3 * estimated_matrix_bytes(model_cfg, options.max_layers,
                                                                     options.weight_rounding) + 4 * 2**20)
    return cfg


def _parse_payload_config(payload: dict, path) -> FlatQuantConfig:
    try:
        return parse_config(payload["config"])
    except ConfigError as exc:
        raise MatrixFileError(f"Matrix file {Path(path).name!r} holds an invalid config: {exc}") from exc


def check_trained_layer(index: int, state: dict, first_loss: float, last_loss: float,
                        reporter=None) -> Optional[str]:
    """After a layer trains: non-finite parameters stop the job; a loss that ended higher than it started gives
    a warning text, returned and emitted as a 'warning' event through ``reporter`` (the log and the GUI)."""
    bad = non_finite_tensors(state)
    if not bad and math.isfinite(first_loss) and not math.isfinite(last_loss):
        bad = [f"loss {last_loss}"]
    if bad:
        raise CalibrationError(f"Layer {index} trained to NaN/inf values ({', '.join(bad[:3])}"
                               f"{', ...' if len(bad) > 3 else ''}); lower --flat_lr or --epochs, or check the "
                               "model's weights. Nothing was marked complete.")
    warning = loss_rise_warning(index, first_loss, last_loss)
    if warning and reporter is not None:
        reporter.emit("loss_rose", loss_rise_params(index, first_loss, last_loss), layer=index)
    return warning


def loss_change(first_loss: float, last_loss: float) -> str:
    """'-10.2%': how training moved a layer's loss (small losses hide a real change at 4 digits)."""
    if not (math.isfinite(first_loss) and math.isfinite(last_loss)) or first_loss == 0:
        return "n/a"
    return f"{100 * (last_loss / first_loss - 1):+.1f}%"


def loss_rise_params(index: int, first_loss: float, last_loss: float) -> Optional[dict]:
    """The 'loss_rose' event's parameters (core.events) when a layer's loss ended higher than it started."""
    if math.isfinite(first_loss) and math.isfinite(last_loss) and last_loss > first_loss * LOSS_RISE_TOLERANCE:
        return {"i": index + 1, "first": first_loss, "last": last_loss, "change": loss_change(first_loss, last_loss)}
    return None


def loss_rise_warning(index: int, first_loss: float, last_loss: float) -> Optional[str]:
    params = loss_rise_params(index, first_loss, last_loss)
    return None if params is None else render_event("loss_rose", params)


def loss_warnings(layer_results: Iterable) -> list[str]:
    """The loss-rise warnings for LayerResult-like objects (index, first_loss, last_loss), for report.json."""
    return [w for r in layer_results if (w := loss_rise_warning(r.index, r.first_loss, r.last_loss))]


# --- writes -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def undone_unless_measured(output_dir: str | os.PathLike, sections: Iterable[str]):
    """A job that fails (or is cancelled) before it measured anything leaves ``output_dir`` as it found it: the
    entries it added go and report.json gets its old bytes back, so a run that did nothing writes no report. Once
    one of ``sections`` is in the report, everything written stays (a failed later section keeps the others)."""
    folder = Path(output_dir)
    before = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    report = folder / REPORT_NAME
    old = report.read_bytes() if report.is_file() else None
    try:
        yield
    except BaseException:
        old_report = _parsed(old)
        if all(load_report(folder).get(k) == old_report.get(k) for k in sections):
            _restore(folder, before, report, old)
        raise


def _parsed(report: Optional[bytes]) -> dict:
    try:
        data = json.loads(report) if report else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _restore(folder: Path, before: set, report: Path, old: Optional[bytes]) -> None:
    if not folder.is_dir():
        return
    close_file_logs(folder)
    for p in folder.iterdir():
        if p.name in before:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if old is not None:
        atomic_write_bytes(report, old)


def write_error(exc: OSError, output_dir: Path, kept: Optional[Path] = None) -> OutputError:
    """One line for a failed write: what failed, what was kept, how to go on."""
    what = Path(exc.filename).name if getattr(exc, "filename", None) else str(output_dir)
    reason = exc.strerror or type(exc).__name__
    if kept is not None and kept.exists():
        keep = (f"the finished layers are kept in {kept.name}; free space (or fix permissions) and run the same "
                "command again to resume")
    else:
        keep = "nothing was written; free space (or fix permissions) and run the command again"
    return OutputError(f"Could not write {what!r} in --output_dir {str(output_dir)!r}: {reason}; {keep}.")


def guarded_job(kept_name: Optional[str] = None) -> Callable:
    """Decorator for a job taking an options object with .output_dir: an OSError on a write becomes one
    OutputError line saying what was kept (``kept_name`` in the folder) and how to continue, and a failed job
    that created its output folder and wrote nothing but its log removes it again."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(options, *args, **kwargs):
            out_dir = Path(options.output_dir)
            existed = out_dir.exists()
            try:
                return fn(options, *args, **kwargs)
            except OSError as exc:
                if not _is_write_error(exc, out_dir):
                    raise
                _cleanup(out_dir, existed)
                raise write_error(exc, out_dir, out_dir / kept_name if kept_name else None) from exc
            except BaseException:
                _cleanup(out_dir, existed)
                raise

        return run

    return wrap


def _is_write_error(exc: OSError, out_dir: Path) -> bool:
    if exc.errno in _FULL_ERRNOS:
        return True
    name = getattr(exc, "filename", None)
    if exc.errno not in _WRITE_ERRNOS or not name:
        return False
    path, folder = Path(name).resolve(), out_dir.resolve()
    return path == folder or folder in path.parents


def _cleanup(out_dir: Path, existed: bool) -> None:
    if not existed:
        try:
            remove_if_only_logs(out_dir)
        except OSError:
            pass


def safe_message(message: str, roots: Iterable[str | os.PathLike] = ()) -> str:
    """A message for a GUI user: absolute paths of the server's own files become names relative to the given roots
    (e.g. the runs folder), and any other absolute path (temp folders, uploads) is cut to its last component."""
    import re

    out = message
    for root in sorted({str(Path(r).resolve()) for r in roots}, key=len, reverse=True):
        out = out.replace(root + os.sep, "")
    return re.sub(r"(?<![\w.])/(?:[^\s'\"/:,;()]+/)+([^\s'\"/:,;()]+)", r"\1", out)
