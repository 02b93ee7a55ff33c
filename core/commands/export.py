"""`python -m core export`: write the real-quant (packed int4) checkpoint of a calibrated model."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="write a real-quant W4A4 checkpoint (packed int4 weights) from saved FlatQuant matrices",
        description="Load a model and its flat_matrices.pth, convert every quantized linear to real int4, and write "
                    "OUTPUT_DIR/model.safetensors (packed int4 weights, scales, transforms, clip ratios), "
                    "quant_config.json, config.json and the tokenizer. The folder loads back with "
                    "core.realquant.load_checkpoint, without recalibration and without the original weights.")
    p.add_argument("--model_path", default=None, help="local model folder, or 'smollm2' (default) for the embedded "
                                                      "SmolLM2-135M-Instruct")
    p.add_argument("--flat_matrix_path", required=True, help="flat_matrices.pth written by `python -m core quantize`")
    p.add_argument("--output_dir", required=True, help="checkpoint folder to write")
    p.add_argument("--backend", default="auto", help="real-quant backend for the conversion: auto | cpu | cpu-torch | "
                                                     "cuda | npu (the stored format is the same for all)")
    p.add_argument("--device", default="cpu", help="where to load the model: cpu (default) | cuda | npu | auto")
    p.add_argument("--verify", action="store_true", help="reload the written checkpoint and check that it gives the "
                                                         "same logits as the converted model in memory")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..device import resolve_device
    from ..matrices import load_matrices
    from ..models import load_model
    from ..realquant.checkpoint import export_checkpoint, load_checkpoint
    from ..realquant.convert import convert_model, memory_sizes

    device = resolve_device(args.device)
    print(f"Loading {args.model_path or 'smollm2 (embedded default)'} on {device} ...", file=sys.stderr)
    loaded = load_model(args.model_path, device=device)
    cfg = load_matrices(args.flat_matrix_path, loaded.model)
    model = convert_model(loaded.model, args.backend)
    mem = memory_sizes(model)
    info = export_checkpoint(model, loaded.tokenizer, args.output_dir, cfg)
    mib = 2 ** 20
    print(f"Quantized linears on disk: {info['quantized_linear_bytes'] / mib:.2f} MiB (packed int4 + scales) vs "
          f"{info['quantized_linear_bf16_bytes'] / mib:.2f} MiB in bf16: {info['ratio_to_bf16']:.3f}x")
    print(f"Quantized linears in memory ({mem['backend']} backend, {', '.join(mem['weight_layout'])}): "
          f"{mem['in_memory_bytes'] / mib:.2f} MiB: {mem['ratio_to_bf16']:.3f}x of bf16")
    print(f"Checkpoint: {info['output_dir']} (model.safetensors {info['file_bytes'] / mib:.1f} MiB)")
    if args.verify:
        reloaded = load_checkpoint(args.output_dir, device=device, backend=args.backend)
        ids = loaded.tokenizer("FlatQuant keeps the model's outputs close while its weights shrink to four bits.",
                               return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            a = model(input_ids=ids).logits.float()
            b = reloaded.model(input_ids=ids).logits.float()
        diff = float((a - b).abs().max())
        if diff != 0.0:
            print(f"error: the reloaded checkpoint's logits differ from the converted model's (max abs diff {diff:.3g})",
                  file=sys.stderr)
            return 1
        print("Verified: the reloaded checkpoint gives identical logits.")
    print("All done!")
    return 0
