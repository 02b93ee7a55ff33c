"""What an Ascend export needs from the server: the facts the exported folder's README.md and its
quant_model_description.json metadata state, and `python -m core doctor` prints.

Sources (checked, not guessed):
- vllm-ascend: W4A4_FLATQUANT_DYNAMIC came with commit 4f6d60eb ("Add W4A4 Flat Quantization support", #3427), first
  tagged v0.11.0rc1; that release's docs/source/installation.md asks for CANN >= 8.3.RC1 and torch-npu == 2.7.1.
  Its vllm_ascend/quantization/methods/w4a4_flatquant.py factors the width n itself (get_decompose_dim), passes the
  stored clip_ratio unchanged to ``torch_npu.npu_kronecker_quant`` and splits calls above 32768 tokens.
- the clip convention: ``ascend_reference.ReferenceW4A4Linear`` (and ``core.quantizer``) compute the activation scale
  as clip_ratio * max|x| / 7, the form of torch_npu's current npu_kronecker_quant page; CANN 8.1/8.2 pages (and
  op-plugin's test golden) print max|x| / (7 * clip_ratio), under which the stored ratios would widen the range.
- which CANN / torch_npu release first accepts Kronecker factors up to 256 (a right factor a multiple of 8, not 16):
  not confirmed from a document; the versions above are the ones vllm-ascend's W4A4 release was built against.
"""
from __future__ import annotations

from typing import Iterable

from .ascend_reference import CLIP_CONVENTION, FLOAT_TYPE, KRONECKER_MAX_FACTOR, METADATA_KEY, QUANT_TYPE

OLD_CLIP_CONVENTION = "scale = max|x| / (7 * clip_ratio)"
SERVE_COMMAND = "vllm serve {folder} --quantization ascend"
REQUIREMENTS = {
    "vllm-ascend": ">= 0.11.0rc1 (the first release with W4A4_FLATQUANT_DYNAMIC)",
    "CANN": ">= 8.3.RC1 (what vllm-ascend 0.11.0rc1 requires; the minimum for these factor sizes: not confirmed)",
    "torch_npu": "2.7.1 (what vllm-ascend 0.11.0rc1 requires; the minimum for these factor sizes: not confirmed)",
}
CLIP_NOTE = (f"the stored clip_ratio values assume {CLIP_CONVENTION} (torch_npu's current npu_kronecker_quant "
             f"documentation, and this project's reference loader). CANN 8.1/8.2 pages print "
             f"{OLD_CLIP_CONVENTION}: a kernel that computes that needs 1 / clip_ratio instead, which vllm-ascend "
             "does not do.")
LINEAR_SUFFIXES = ("_proj.weight", "lm_head.weight")
README_FILE = "README.md"


def float_linears(description: dict) -> dict[str, int]:
    """Linear name (q_proj, o_proj, lm_head, ...) -> how many of them the description types FLOAT."""
    out: dict[str, int] = {}
    for name, kind in description.items():
        if kind == FLOAT_TYPE and name.endswith(LINEAR_SUFFIXES):
            short = name.rsplit(".", 2)[-2]
            out[short] = out.get(short, 0) + 1
    return dict(sorted(out.items()))


def metadata(description: dict, dtype: str, factors: Iterable[tuple[int, int]], notes: Iterable[str] = ()) -> dict:
    """The facts the folder needs from the server (stored under ascend_reference.METADATA_KEY)."""
    sizes = sorted({tuple(f) for f in factors})
    return {"written_by": "FlatQuant Studio (python -m core export --format ascend)",
            "serve": SERVE_COMMAND.format(folder="DIR"), "quant_type": QUANT_TYPE,
            "quantized_linears": sum(1 for k, v in description.items() if v == QUANT_TYPE and k.endswith(".weight")),
            "float_linears": float_linears(description), "float_dtype": dtype,
            "clip_convention": CLIP_CONVENTION, "clip_note": CLIP_NOTE,
            "kronecker_factors": [list(f) for f in sizes], "kronecker_max_factor": KRONECKER_MAX_FACTOR,
            "requires": dict(REQUIREMENTS), "notes": list(notes)}


def requirement_lines(meta: dict | None = None) -> list[str]:
    """The facts as short lines (README bullets, `doctor` output)."""
    meta = meta or {}
    lines = [f"serve: `{meta.get('serve', SERVE_COMMAND.format(folder='DIR'))}`",
             f"quant type: {QUANT_TYPE} (int4 weights per output channel, int4 activations per token)",
             f"activation clip convention: {CLIP_NOTE}"]
    if meta:
        floats = ", ".join(f"{k} x{n}" for k, n in meta["float_linears"].items()) or "none"
        factors = ", ".join(f"{a}x{b}" for a, b in meta["kronecker_factors"]) or "none"
        lines += [f"quantized linears: {meta['quantized_linears']}; linears kept float: {floats}",
                  f"float parts (embeddings, norms, transforms, float linears): {meta['float_dtype']}",
                  f"Kronecker factors (left x right): {factors} (the CANN kernel takes at most "
                  f"{KRONECKER_MAX_FACTOR})"]
    else:
        lines += ["float parts: bfloat16 or float16 (vllm-ascend serves no float32 W4A4 model)",
                  f"Kronecker factors: at most {KRONECKER_MAX_FACTOR} each, the right one a multiple of 8 (the "
                  "server factors each input width itself)"]
    lines += [f"{name}: {need}" for name, need in REQUIREMENTS.items()]
    return lines


def readme_text(meta: dict) -> str:
    """The exported folder's README.md."""
    body = "\n".join(f"- {line}" for line in requirement_lines(meta))
    notes = "".join(f"\n- note: {n}" for n in meta.get("notes", ()))
    return (f"# W4A4 FlatQuant model for vllm-ascend\n\nWritten by FlatQuant Studio. Serve it with\n\n"
            f"```bash\n{SERVE_COMMAND.format(folder='THIS_FOLDER')}\n```\n\n{body}{notes}\n\nThe same facts are in "
            f"quant_model_description.json under \"{METADATA_KEY}\" (no tensor name: the server ignores it).\n")
