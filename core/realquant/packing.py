"""Integer formats of the real-quant path.

- Weights: symmetric per output channel, computed with the very functions the fake-quant model uses
  (``core.quantizer``), so the integer codes are identical to the ones it simulates.
- Activations: symmetric per token (dynamic), same formula: scale = clip·absmax / qmax, q = clamp(round(x / scale)).
- Storage: two int4 codes per byte, two's complement nibbles, the even index in the low nibble. Read as
  little-endian int32 words, this is exactly the layout of torch_npu's int4 pack (8 codes per int32, element i in
  bits 4i..4i+3), so the NPU backend can take the bytes as they are.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from ..quantizer import quantize_codes


def quantize_weight(weight: torch.Tensor, bits: int, clip: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [out, in] (values in [-2^(b-1), 2^(b-1)-1]) and fp32 scales [out] of an [out, in] weight."""
    if not 2 <= bits <= 8:
        raise ValueError(f"real-quant weights need 2..8 bits, got {bits}")
    clip = None if clip is None else clip.detach().float().reshape(-1, 1).to(weight.device)
    q, scale = quantize_codes(weight.detach(), bits, 1, clip)
    return q.to(torch.int8), scale.reshape(-1)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fake-quant weight W_dq = q·scale (fp32), bit-identical to ``fake_quant_sym`` on the same weight."""
    return q.float() * scale.float().reshape(-1, 1)


def quantize_activation(x: torch.Tensor, bits: int, clip: Optional[float] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes [..., K] and fp32 scales [..., 1] (reference math; the backends compute the same)."""
    q, scale = quantize_codes(x, bits, -1, clip)
    return q.to(torch.int8), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], shape [..., K] -> uint8 [..., ceil(K/2)]; an odd K is padded with a zero code."""
    if q.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"pack_int4 expects integer codes, got {q.dtype}")
    k = q.shape[-1]
    if k % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., ceil(K/2)] -> int8 codes [..., K]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    if packed.shape[-1] != (k + 1) // 2:
        raise ValueError(f"packed last dim {packed.shape[-1]} does not hold {k} int4 codes")
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    codes = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], -1)[..., :k]
    return (codes - ((codes & 0x8) << 1)).to(torch.int8)  # sign-extend the nibble


def pack_int4_as_int32(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [..., K] (K a multiple of 8) -> int32 [..., K/8] in torch_npu's int4 layout."""
    if q.shape[-1] % 8:
        raise ValueError(f"the int32 int4 layout needs the last dim to be a multiple of 8, got {q.shape[-1]}")
    if sys.byteorder != "little":  # the NPU layout is defined on little-endian words
        raise RuntimeError("pack_int4_as_int32 needs a little-endian host")
    return pack_int4(q).view(torch.int32)


def unpack_int4_from_int32(words: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4_as_int32 (also reads torch_npu's packed outputs)."""
    return unpack_int4(words.contiguous().view(torch.uint8), words.shape[-1] * 8)
