"""CUDA checks of the real-quant path (run when a GPU is lent; the default suite has no GPU): on small random Qwen3
and Qwen2 models with the FlatQuant structure folded, the `cuda` real-quant backend's logits must equal the folded
fake-quant model's exactly (both sum int codes exactly: torch._int_mm with zero padding for cuBLASLt's shape rules)
for prompt and decode shapes, and greedy generation must give the same tokens. Two configs: the default (o_proj and
lm_head float) and every linear quantized (o_proj W4A4 on the integer kernels, lm_head int8), both models running
the project's ``flatquant`` attention; the latter also decodes on a preallocated cache (core.latency.greedy_decode).
Prints one JSON line per check and exits 1 when one fails.

    python bench/cuda_check.py          # or: python bench/cuda_check.py cpu
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.algorithms import apply_flat_structure  # noqa: E402
from core.attention import use_flatquant_attention  # noqa: E402
from core.config import parse_config  # noqa: E402
from core.flat import fold_model  # noqa: E402
from core.latency import greedy_decode  # noqa: E402
from core.models import build_random_qwen2, build_random_qwen3  # noqa: E402
from core.realquant.convert import convert_model  # noqa: E402
from latency import QUANT_CONFIGS  # noqa: E402  (bench/latency.py, beside this script)

ALL_LINEARS = QUANT_CONFIGS["all"][1]  # o_proj W4A4 + int8 lm_head


def main() -> int:
    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")  # `cpu`: the same checks of the cpu backend
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible")
        return 2
    ok = True
    label = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(json.dumps({"device": label, "torch": torch.__version__}), flush=True)
    for name, build, cfg in (("qwen3", build_random_qwen3, None), ("qwen2", build_random_qwen2, None),
                             ("qwen3-all-linears", build_random_qwen3, ALL_LINEARS),
                             ("qwen2-all-linears", build_random_qwen2, ALL_LINEARS)):
        fake = build()
        apply_flat_structure(fake, parse_config(cfg))
        fold_model(fake)
        fake.eval()
        if cfg is not None:
            use_flatquant_attention(fake)
        real = convert_model(copy.deepcopy(fake).to(dev), dev.type)
        fake.to(dev)
        g = torch.Generator().manual_seed(5)
        for shape in ((1, 1), (1, 3), (2, 9), (1, 40), (3, 17)):
            ids = torch.randint(0, fake.config.vocab_size, shape, generator=g).to(dev)
            with torch.no_grad():
                a, b = real(input_ids=ids).logits, fake(input_ids=ids).logits
            equal = bool(torch.equal(a, b))
            ok &= equal
            print(json.dumps({"model": name, "shape": shape, "real_equals_fake": equal,
                              "max_abs_diff": float((a - b).abs().max())}), flush=True)
        ids = torch.randint(0, fake.config.vocab_size, (1, 12), generator=g).to(dev)
        with torch.no_grad():
            ta = real.generate(ids, max_new_tokens=8, do_sample=False)
            tb = fake.generate(ids, max_new_tokens=8, do_sample=False)
        same = bool(torch.equal(ta, tb))
        ok &= same
        print(json.dumps({"model": name, "greedy_8_tokens_equal": same}), flush=True)
        if cfg is not None:
            kinds = sorted({type(m).__name__ for m in real.modules() if "Linear" in type(m).__name__})
            (_, _, ga), (_, _, gb) = greedy_decode(real, ids, 8), greedy_decode(fake, ids, 8)
            same = bool(torch.equal(ga, gb)) and bool(torch.equal(ga[:, :8], ta[:, 12:]))
            ok &= same
            print(json.dumps({"model": name, "static_cache_decode_equal": same, "attention":
                              real.config._attn_implementation, "linear_kinds": kinds}), flush=True)
    print(json.dumps({"all_ok": ok}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
