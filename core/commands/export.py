"""`python -m core export`: write a calibrated model as a deployable folder.

--format native (default): this project's real-quant checkpoint (packed int4, core.realquant.load_checkpoint).
--format ascend: the layout vllm-ascend serves (`vllm serve DIR --quantization ascend`), W4A4_FLATQUANT_DYNAMIC.
"""
from __future__ import annotations

import argparse
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="write a deployable W4A4 folder (native int4 checkpoint, or vllm-ascend's layout) from saved "
                       "FlatQuant matrices",
        description="Load a model and its flat_matrices.pth and write OUTPUT_DIR. --format native: packed int4 "
                    "weights, scales, transforms and clip ratios in model.safetensors + quant_config.json, loaded "
                    "back by core.realquant.load_checkpoint. --format ascend: config.json (\"quantize\": "
                    "\"w4a4_flatquant_dynamic\"), quant_model_description.json and "
                    "quant_model_weight_w4a4_flatquant_dynamic*.safetensors, served by vllm-ascend "
                    "(`vllm serve OUTPUT_DIR --quantization ascend`). The folder is written under a temp name and "
                    "renamed when complete.")
    p.add_argument("--format", default="native", choices=("native", "ascend"),
                   help="native (default): this project's int4 checkpoint; ascend: vllm-ascend's "
                        "W4A4_FLATQUANT_DYNAMIC layout")
    p.add_argument("--model_path", default=None, help="local model folder, or 'smollm2' (default) for the embedded "
                                                      "SmolLM2-135M-Instruct")
    p.add_argument("--flat_matrix_path", required=True, help="flat_matrices.pth written by `python -m core quantize`")
    p.add_argument("--output_dir", required=True, help="folder to write (new, empty, or replaced with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists and is not empty")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype of the float parts (embeddings, norms, transforms): auto = the model's own 16-bit "
                        "dtype, bfloat16 for a float32 checkpoint (the serving dtype); float32: native only")
    p.add_argument("--shard_size", default="2GB", help="largest safetensors shard (e.g. 2GB, 500MB); larger models get "
                                                       "-0000i-of-0000n shards and an index file")
    p.add_argument("--backend", default="auto", help="native: real-quant backend for the conversion: auto | cpu | "
                                                     "cpu-torch | cuda | npu (the stored format is the same for all)")
    p.add_argument("--device", default="cpu", help="native: where to load the model: cpu (default) | cuda | npu | "
                                                   "auto (the ascend export streams on the host)")
    p.add_argument("--verify", action="store_true", help="native: reload the written checkpoint and check that it "
                                                         "gives the same logits as the converted model in memory")
    p.set_defaults(func=run)
    return p


def _dtypes(args, model_path: str):
    """(dtype to load the model in, dtype of the exported float parts)."""
    import torch

    from ..realquant.folder import serving_dtype, source_dtype

    own = source_dtype(model_path)
    out = serving_dtype(own) if args.dtype == "auto" else getattr(torch, args.dtype)
    return own, out


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..models import resolve_model_path

    if args.format == "ascend" and args.dtype == "float32":
        raise UsageError("--dtype float32 cannot be served: vllm-ascend runs W4A4 models in bfloat16 or float16; use "
                         "--dtype auto, bfloat16 or float16 with --format ascend.")
    from ..realquant.folder import claim_target, parse_size

    source = resolve_model_path(args.model_path)
    inputs = [("--model_path", source), ("--flat_matrix_path", args.flat_matrix_path)]
    with claim_target(args.output_dir, inputs, args.overwrite) as target:  # before anything slow; one export at a time
        return _export(args, source, target, parse_size(args.shard_size))


def _export(args: argparse.Namespace, source, target, shard_bytes: int) -> int:
    from ..config import parse_config
    from ..errors import MatrixFileError
    from ..matrices import check_identity, check_layer_indices, read_complete_matrices
    from ..models import decoder_layers, load_model
    from ..realquant.ascend import check_config, check_fused_skips

    payload = read_complete_matrices(args.flat_matrix_path)
    meta = payload.get("meta") or {}
    made_with = [f"--{k} {meta[k]}" for k, plain in (("algorithm", "flatquant"), ("weight_rounding", "rtn"))
                 if meta.get(k, plain) != plain]
    if made_with:  # the ascend layout is FlatQuant's; the other files are exported from their quantize run
        raise MatrixFileError(f"Matrix file {args.flat_matrix_path!r} was made with {' '.join(made_with)}; export "
                              "from a matrix file takes FlatQuant files with RTN rounding only: export that run "
                              "with `quantize ... --export native|ascend` instead.")
    cfg = parse_config(payload["config"])
    if args.format == "ascend":
        check_config(cfg)
        check_fused_skips(cfg, sorted(int(i) for i in payload["layers"]))
    load_dtype, out_dtype = _dtypes(args, str(source))
    device = "cpu" if args.format == "ascend" else args.device
    if device != "cpu":
        from ..device import resolve_device

        device = resolve_device(device)
    print(f"Loading {args.model_path or 'smollm2 (embedded default)'} ({str(load_dtype).replace('torch.', '')}) "
          f"on {device} ...", file=sys.stderr)
    loaded = load_model(args.model_path, device=device, dtype=load_dtype)
    check_identity(payload, loaded.model, args.flat_matrix_path)
    check_layer_indices(decoder_layers(loaded.model), payload["layers"], args.flat_matrix_path)
    if args.format == "ascend":
        return _run_ascend(args, loaded, payload, cfg, source, out_dtype, shard_bytes)
    return _run_native(args, loaded, payload, target, out_dtype, shard_bytes)


def _run_ascend(args, loaded, payload, cfg, source, dtype, shard_bytes: int) -> int:
    from ..realquant.ascend import export_ascend

    layers = {int(i): s for i, s in payload["layers"].items()}
    info = export_ascend(loaded.model, cfg, loaded.tokenizer, args.output_dir, layer_states=layers, consume=True,
                         overwrite=args.overwrite, source_dir=source, shard_bytes=shard_bytes, dtype=dtype)
    mib = 2 ** 20
    print(f"Quantized linears ({info['quantized_linears']}): {info['quantized_linear_bytes'] / mib:.2f} MiB (int4 "
          f"codes held in int8, scales, transforms) vs {info['quantized_linear_bf16_bytes'] / mib:.2f} MiB in bf16: "
          f"{info['ratio_to_bf16']:.3f}x")
    print(f"Ascend folder: {info['output_dir']} ({len(info['files'])} safetensors file(s), "
          f"{info['weights_bytes'] / mib:.1f} MiB, float parts in {info['dtype']}); serve it with "
          f"`vllm serve {args.output_dir} --quantization ascend` (its README.md lists what the server needs)")
    print("All done!")
    return 0


def _run_native(args, loaded, payload, target, dtype, shard_bytes: int) -> int:
    import torch

    from ..algorithms import prepare_model
    from ..matrices import matrix_algorithm
    from ..realquant.checkpoint import export_checkpoint, load_checkpoint
    from ..realquant.folder import StagedFolder

    algo = matrix_algorithm(payload, args.flat_matrix_path)
    prepare_model(algo, loaded.model)
    layers = {int(i): s for i, s in payload["layers"].items()}
    with StagedFolder(target) as staged:  # one layer at a time; --verify keeps the converted model to compare
        info = export_checkpoint(loaded.model, loaded.tokenizer, staged.path, algo.cfg, backend=args.backend,
                                 dtype=dtype, layer_states=layers, algorithm=algo, consume=not args.verify,
                                 shard_bytes=shard_bytes)
        staged.commit()
    mem = info["in_memory"]
    mib = 2 ** 20
    print(f"Quantized linears on disk: {info['quantized_linear_bytes'] / mib:.2f} MiB (packed int4 + scales) vs "
          f"{info['quantized_linear_bf16_bytes'] / mib:.2f} MiB in bf16: {info['ratio_to_bf16']:.3f}x")
    print(f"Quantized linears in memory ({mem['backend']} backend, {', '.join(mem['weight_layout'])}): "
          f"{mem['in_memory_bytes'] / mib:.2f} MiB: {mem['ratio_to_bf16']:.3f}x of bf16")
    files = info["files"]
    print(f"Checkpoint: {target} ({files[0] if len(files) == 1 else f'{len(files)} safetensors shards'}, "
          f"{info['file_bytes'] / mib:.1f} MiB, float parts in {str(dtype).replace('torch.', '')}; written one "
          "decoder layer at a time)")
    if args.verify:
        model = loaded.model
        _cast_like_a_load(model, dtype)
        reloaded = load_checkpoint(target, device=next(model.parameters()).device, backend=args.backend)
        ids = loaded.tokenizer("FlatQuant keeps the model's outputs close while its weights shrink to four bits.",
                               return_tensors="pt").input_ids.to(next(model.parameters()).device)
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


def _cast_like_a_load(model, dtype) -> None:
    """model.to(dtype) as load_checkpoint builds it: rotary frequencies computed in fp32, and the fp32 per-channel
    scales with their fp32 values (RealQuantLinear._apply keeps their dtype but rounds them through ``dtype``)."""
    keep = {(m, n): b for m in model.modules() for n, b in m._buffers.items()
            if b is not None and n in ("inv_freq", "original_inv_freq", "w_scale")}
    model.to(dtype)
    for (m, n), b in keep.items():
        m._buffers[n] = b
