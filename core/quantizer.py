"""Symmetric integer quantization math (fake-quant with straight-through rounding) and learnable clipping."""
from __future__ import annotations

import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# sigmoid(4.0) = 0.982: the clip factors start just inside the absmax, as in the FlatQuant paper.
CLIP_INIT = 4.0


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward."""
    return (x.round() - x).detach() + x


def sym_scale(max_abs: torch.Tensor, bits: int) -> torch.Tensor:
    return (max_abs / qmax(bits)).clamp(min=1e-8)


def quantize_sym(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) in [-2^(b-1), 2^(b-1)-1]; differentiable through round_ste."""
    return torch.clamp(round_ste(x / scale), -qmax(bits) - 1, qmax(bits))


def quantize_codes(x: torch.Tensor, bits: int, dim: int = -1, clip_ratio: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (as fp32) and fp32 scales, one scale per slice along ``dim`` (per token: dim=-1 of activations;
    per output channel: dim=1 of an [out, in] weight): scale = clip·absmax / qmax, q = clamp(round(x / scale))."""
    xf = x.float()
    max_abs = xf.abs().amax(dim=dim, keepdim=True)
    if clip_ratio is not None:
        max_abs = max_abs * clip_ratio
    scale = sym_scale(max_abs, bits)
    return quantize_sym(xf, scale, bits), scale


# The fused node works through a large input in row blocks of about this many elements (rows are independent, so
# the result is the same). On CPU small blocks keep its passes in cache instead of streaming activation-sized
# temporaries through memory (2.4x faster forward + backward on a [2048, 1536] bf16 input here); smaller inputs take
# one block: each extra op costs a thread wake-up. On accelerators large blocks only bound the temporaries: the
# backward of a 7B layer's [11008, 4096] weight otherwise holds about six fp32 copies of it at once (~1 GiB).
BLOCK_ELEMENTS = {"cpu": 1 << 19}
DEVICE_BLOCK_ELEMENTS = 1 << 22  # devices not in BLOCK_ELEMENTS: 16 MiB fp32 temporaries above 64 MiB inputs
CLIP_SEARCH_ELEMENTS = 1 << 22  # WeightQuantizer.init_clip_mse: rows per block of its grid search


def row_spans(rows: int, cols: int, elements: int) -> list[tuple[int, int]]:
    """(start, end) spans of whole rows of a [rows, cols] tensor, each at most ``elements`` values (one row at
    least): what the row-blocked passes over 7B weights iterate."""
    step = max(1, elements // max(1, cols))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _row_blocks(x2: torch.Tensor):
    block = BLOCK_ELEMENTS.get(x2.device.type, DEVICE_BLOCK_ELEMENTS)
    return row_spans(x2.shape[0], x2.shape[1], block if x2.numel() > 4 * block else x2.numel())


def _rows_of(clip_ratio: Optional[torch.Tensor], a: int, b: int) -> Optional[torch.Tensor]:
    """The clip ratio of rows a..b: one per row (LWC, [rows, 1]) or one for all (LAC)."""
    if clip_ratio is None or clip_ratio.numel() == 1:
        return clip_ratio
    return clip_ratio.reshape(-1, 1)[a:b]


class _FakeQuantSym(torch.autograd.Function):
    """Quantize-dequantize along the last dim with straight-through rounding, as one autograd node.

    Calibration time is dominated by elementwise passes over the activations; autograd through the composed formula
    makes about three times as many as this. The gradients are the composed formula's: identity where the code is
    inside the clamp range, plus the path through the scale to the clip ratio and to the row's absmax element
    (one element where several tie; the composed amax would split it among them)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip_ratio: Optional[torch.Tensor], bits: int) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(x2)
        scale = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
        for a, b in _row_blocks(x2):
            q, s = quantize_codes(x2[a:b], bits, -1, _rows_of(clip_ratio, a, b))
            out[a:b] = q.mul_(s)
            scale[a:b] = s
        ctx.bits = bits
        ctx.save_for_backward(x, scale, clip_ratio)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale, clip_ratio = ctx.saved_tensors
        x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, x.shape[-1])
        grad_x = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        want_clip = clip_ratio is not None and ctx.needs_input_grad[1]
        grad_clip_rows = torch.empty_like(scale) if want_clip else None
        for a, b in _row_blocks(x2):
            gx, gc = _fake_quant_grad(x2[a:b], g2[a:b], scale[a:b], _rows_of(clip_ratio, a, b), ctx.bits)
            grad_x[a:b] = gx
            if want_clip:
                grad_clip_rows[a:b] = gc
        grad_clip = None
        if want_clip:
            grad_clip = grad_clip_rows.sum().reshape(clip_ratio.shape) if clip_ratio.numel() == 1 \
                else grad_clip_rows.reshape(clip_ratio.shape)
            grad_clip = grad_clip.to(clip_ratio.dtype)
        return grad_x.view(x.shape), grad_clip, None


def _fake_quant_grad(x: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, clip_ratio: Optional[torch.Tensor],
                     bits: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of q·s (q = clamp(round_ste(x / s)), s = clip·absmax / qmax) for rows [R, K]: to x, and per row
    to the clip ratio."""
    lo, hi = -qmax(bits) - 1, qmax(bits)
    g, xf = grad.float(), x.float()
    xs = xf / scale
    codes = xs.round()
    if clip_ratio is None:  # |x / scale| <= qmax: nothing is clamped
        grad_x = g.clone()
        residual = codes.sub_(xs)  # d(q·s)/ds = q - x/s
    else:
        inside = (codes >= lo) & (codes <= hi)
        grad_x = g * inside
        residual = codes.clamp_(lo, hi).sub_(xs * inside)
    grad_scale = (g * residual).sum(-1, keepdim=True) * (scale > 1e-8)  # the 1e-8 floor stops the gradient
    absx = xf.abs()
    amax, idx = absx.max(-1, keepdim=True)
    ratio = 1.0 if clip_ratio is None else clip_ratio
    grad_x.scatter_add_(-1, idx, grad_scale * ratio / hi * torch.sign(xf.gather(-1, idx)))
    grad_clip = None if clip_ratio is None else grad_scale * amax / hi
    return grad_x, grad_clip


def fake_quant_sym(x: torch.Tensor, bits: int, dim: int = -1, clip_ratio: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantize-dequantize (see ``quantize_codes``), computed in fp32 whatever the input dtype."""
    if bits >= 16:
        return x
    if dim not in (-1, x.dim() - 1):
        q, scale = quantize_codes(x, bits, dim, clip_ratio)
        return (q * scale).to(x.dtype)
    return _FakeQuantSym.apply(x, clip_ratio, bits)


INT_GEMM_ENV = "FLATQUANT_INT_GEMM"  # auto | int | float: force the integer GEMM's implementation (tests)
# x86 flags with which oneDNN's int8 GEMM (torch._int_mm) is fast; without them it is a reference loop, 35-75x slower
# than an fp32 matmul of the same shape.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
FP32_EXACT_LIMIT = 1 << 24  # every integer of magnitude <= 2^24 is exact in fp32


# ONEDNN_MAX_CPU_ISA values that keep oneDNN below its VNNI kernels even on a VNNI CPU
_ONEDNN_CAPS_WITHOUT_VNNI = ("SSE41", "AVX", "AVX2", "AVX512_CORE")


def _cpu_int8_vnni() -> bool:
    """Whether oneDNN (behind torch._int_mm on the CPU) runs VNNI int8 kernels here."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_CAPS_WITHOUT_VNNI:
        return False
    from .device import cpu_flags

    return any(f in cpu_flags() for f in VNNI_FLAGS)


def int8_gemm_is_fast(device: torch.device) -> bool:
    """Whether torch._int_mm is the fast way to an exact integer GEMM on ``device`` (FLATQUANT_INT_GEMM=int|float
    forces the answer)."""
    forced = os.environ.get(INT_GEMM_ENV, "auto").lower()
    if forced in ("int", "float"):
        return forced == "int"
    if device.type != "cpu":
        return device.type == "cuda"
    return _cpu_int8_vnni()


def int8_gemm_is_exact(device: torch.device, a_bits: int, w_bits: int) -> bool:
    """Whether torch._int_mm sums these codes exactly: on CUDA and VNNI CPUs always. Without VNNI oneDNN multiplies
    the activations shifted to unsigned bytes (x + 128) by the weights with vpmaddubsw, whose int16 pair sums
    saturate once 2·(128 + |x|)·|w| passes 32767: 8-bit weights come out wrong there (measured with
    ONEDNN_MAX_CPU_ISA=AVX2), 4-bit ones are safe."""
    return (device.type != "cpu" or 2 * (128 + (1 << (a_bits - 1))) * (1 << (w_bits - 1)) <= (1 << 15) - 1
            or _cpu_int8_vnni())


def float_gemm_is_exact(k: int, a_bits: int, w_bits: int) -> bool:
    """Σ_k q_x·q_w in fp32 is exact (bit-identical to int32) when no partial sum can pass 2^24: |q| <= 2^(bits-1),
    so 4-bit codes are exact up to K = 2^18, 8-bit activations with 4-bit weights up to K = 2^14."""
    return k <= fp32_exact_k(a_bits, w_bits)


def fp32_exact_k(a_bits: int, w_bits: int) -> int:
    """The longest K over which a sum of products of a_bits by w_bits codes cannot pass 2^24 (exact in fp32)."""
    return FP32_EXACT_LIMIT // ((1 << (a_bits - 1)) * (1 << (w_bits - 1)))


CUDA_INT_MM_MIN_ROWS = 17  # cuBLASLt's int8 GEMM behind torch._int_mm: M > 16, K and N multiples of 8


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def int_mm(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm(rows, w.t())`` (int8 [M, K] x int8 [N, K'] -> int32 [M, N]) for any M, K, N, with K' >= K
    (a weight already zero-padded in K). On CUDA the operands are zero-padded to cuBLASLt's rules and the result is
    cut back to M rows; zero codes add nothing, so it is exact. Callers holding weights padded in N slice the
    columns to their width."""
    m, k = rows.shape
    n, kw = w.shape
    cuda = rows.device.type == "cuda"
    kp = _round_up(max(k, kw), 8) if cuda else max(k, kw)
    np_ = _round_up(n, 8) if cuda else n
    if (kw, n) != (kp, np_):
        w = F.pad(w, (0, kp - kw, 0, np_ - n))
    pad_rows = max(CUDA_INT_MM_MIN_ROWS - m, 0) if cuda else 0
    if k != kp or pad_rows:
        rows = F.pad(rows, (0, kp - k, 0, pad_rows))
    return torch._int_mm(rows, w.t())[:m, :n]


def code_matmul(q_x: torch.Tensor, w_codes: torch.Tensor, a_bits: int, w_bits: int) -> torch.Tensor:
    """Exact Σ_k q_x[m, k]·w[n, k] of integer codes ([M, K] · [N, K]ᵀ), int32 or fp32 holding the same integers: the
    int8 GEMM where it is fast (VNNI CPUs, CUDA), else fp32 GEMMs of the codes: one where ``float_gemm_is_exact``,
    beyond it (8-bit codes, K > 1024) one per slice of K that is, their sums added in int32."""
    k, device = q_x.shape[-1], q_x.device
    if a_bits <= 8 and w_bits <= 8 and int8_gemm_is_fast(device) and int8_gemm_is_exact(device, a_bits, w_bits):
        rows = q_x.reshape(-1, k).to(torch.int8)
        return int_mm(rows, w_codes.to(torch.int8)).reshape(*q_x.shape[:-1], -1)
    step = fp32_exact_k(a_bits, w_bits)
    with torch.autocast(device.type, enabled=False):
        if k <= step:
            return F.linear(q_x.float(), w_codes.float())
        acc = None
        for a in range(0, k, step):
            part = F.linear(q_x[..., a:a + step].float(), w_codes[:, a:a + step].float()).to(torch.int32)
            acc = part if acc is None else acc.add_(part)
        return acc


def integer_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                   a_bits: int, a_clip: Optional[torch.Tensor] = None, w_bits: Optional[int] = None) -> torch.Tensor:
    """y = (q_x·q_wᵀ)·s_w·s_x + b: the real-quant kernels' integer math and epilogue order, in float.

    The GEMM of the codes is exact (``code_matmul``: int32, or fp32 where every partial sum is an integer below
    2^24), so a folded fake-quant model gives the real-quant model's outputs bit for bit instead of differing by
    float rounding, which int4 rounding flips would amplify through the layers. ``w_bits`` None: read from the
    codes."""
    q_x, s_x = quantize_codes(x, a_bits, -1, a_clip)
    if w_bits is None:
        w_bits = max(2, int(w_codes.abs().amax()).bit_length() + 1)
    acc = code_matmul(q_x, w_codes, a_bits, w_bits)
    out = acc * w_scale.float().reshape(-1)
    out = out * s_x
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


class SharedInputQuant:
    """q/k/v (and gate/up) read the same activation tensor with the same quantizer: quantize it once (the fake-quant
    ActQuantizer while calibrating, the real-quant kernels' quantize at inference).

    The first member to see a tensor quantizes it; the others reuse the result while the very same tensor object
    (same version counter: not modified in place) comes in. The entry is dropped once every member has used it,
    so no activation is kept alive past its layer. State is per thread: concurrent forwards never share it."""

    def __init__(self, members: int):
        self.members = members
        self._local = threading.local()

    def __deepcopy__(self, memo):
        return SharedInputQuant(self.members)  # members of a copied model share the copy (deepcopy's memo)

    def __getstate__(self):
        return {"members": self.members}

    def __setstate__(self, state):
        self.__init__(state["members"])

    @staticmethod
    def _version_of(x: torch.Tensor) -> int:
        # inference-mode tensors have no version counter; the callers (HF attention/MLP) never modify inputs in place
        return -2 if x.is_inference() else x._version

    def get(self, x: torch.Tensor, compute):
        st = self._local
        if getattr(st, "x", None) is x and st.version == self._version_of(x) and st.left > 0:
            result = st.result
            st.left -= 1
            if st.left == 0:
                self.clear()
            return result
        result = compute()
        if self.members > 1:
            st.x, st.version, st.result, st.left = x, self._version_of(x), result, self.members - 1
        return result

    def clear(self) -> None:
        st = self._local
        st.x, st.result, st.left = None, None, 0


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric weight quantizer with learnable weight clipping (LWC)."""

    def __init__(self, out_features: int, bits: int, lwc: bool):
        super().__init__()
        self.bits = bits
        self.clip = nn.Parameter(torch.full((out_features, 1), CLIP_INIT)) if (lwc and bits < 16) else None

    def clip_ratio(self) -> Optional[torch.Tensor]:
        return torch.sigmoid(self.clip) if self.clip is not None else None

    def forward(self, weight: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Fake-quantize ``weight``; ``rows`` = (a, b): it holds only output rows a..b (their clips apply)."""
        clip = self.clip_ratio()
        if rows is not None and clip is not None:
            clip = clip[rows[0]:rows[1]]
        return fake_quant_sym(weight, self.bits, dim=1, clip_ratio=clip)

    @torch.no_grad()
    def init_clip_mse(self, weight: torch.Tensor, grid: int = 20, low: float = 0.5) -> None:
        """Start each channel's clip at the ratio (of a grid in [low, 1]) with the smallest quantization error:
        with only a few dozen training steps, a good start matters more than the learning rate. Rows are searched
        in blocks of at most CLIP_SEARCH_ELEMENTS values: the temporaries stay small for a 7B layer's weights."""
        if self.clip is None:
            return
        rows = weight.shape[0]
        best = torch.ones(rows, 1, device=weight.device)
        ratios = torch.linspace(low, 1.0, grid + 1).tolist()
        for a, b in row_spans(rows, weight.numel() // max(1, rows), CLIP_SEARCH_ELEMENTS):
            w = weight[a:b].detach().float()
            best_err = torch.full((w.shape[0], 1), float("inf"), device=w.device)
            for r in ratios:
                err = ((fake_quant_sym(w, self.bits, dim=1, clip_ratio=torch.tensor(r)) - w) ** 2).sum(1, keepdim=True)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best[a:b] = torch.where(better, torch.full_like(best_err, r), best[a:b])
        # logit of the ratio, capped where sigmoid would saturate
        self.clip.data = torch.logit(best.clamp(max=0.995)).to(self.clip)


class ActQuantizer(nn.Module):
    """Per-token dynamic symmetric activation quantizer with an optional learnable clip (LAC, one per layer)."""

    def __init__(self, bits: int, lac: bool, members: int = 1):
        super().__init__()
        self.bits = bits
        self.clip = nn.Parameter(torch.tensor(CLIP_INIT)) if (lac and bits < 16) else None
        self.shared = SharedInputQuant(members) if members > 1 else None  # one quantizer feeding several linears

    def clip_ratio(self) -> Optional[torch.Tensor]:
        return torch.sigmoid(self.clip) if self.clip is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def compute():
            return fake_quant_sym(x, self.bits, dim=-1, clip_ratio=self.clip_ratio())
        return compute() if self.shared is None else self.shared.get(x, compute)


def fake_quant_asym(x: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Asymmetric min/max quantize-dequantize, used for the kv-cache when k_sym/v_sym is False."""
    if bits >= 16:
        return x
    xf = x.float()
    lo, hi = xf.amin(dim=dim, keepdim=True), xf.amax(dim=dim, keepdim=True)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(round_ste(xf / scale) + zero, 0, levels)
    return ((q - zero) * scale).to(x.dtype)
