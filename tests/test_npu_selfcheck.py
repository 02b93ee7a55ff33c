"""Issue 23: the NPU backend checks each torch_npu op on first use against the CPU math (core.quantizer,
core.realquant.packing), follows the clip convention and token limit of the installed npu_kronecker_quant, and
replaces an op that raises or differs by the portable torch path with one warning line. torch_npu is the
independent double of tests/torch_npu_double.py (written from torch_npu's documentation; nothing shared with core)."""
import logging

import pytest
import torch
import torch.nn.functional as F

from core.quantizer import fake_quant_sym
from core.realquant.backends import ActQuant, quantize_per_token
from core.realquant.npu import KRON_OLD_MAX_TOKENS, NpuBackend, self_check
from core.realquant.packing import quantize_weight, unpack_int4_from_int32
from torch_npu_double import CLIP_CURRENT, CLIP_OLD, TorchNpuDouble, module, variant

M, A, B, N = 9, 8, 16, 24
CLIP = 0.8


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, A * B, generator=g) * 2).bfloat16()
    left = torch.linalg.qr(torch.randn(A, A, generator=g))[0]
    right = torch.linalg.qr(torch.randn(B, B, generator=g))[0]
    w = torch.randn(N, A * B, generator=g) / (A * B) ** 0.5
    return x, left, right, w


def _run(ops, x, left, right, w):
    """(activation codes, scales, output) of one W4A4 linear with an online transform through the npu backend."""
    be = NpuBackend(ops=ops)
    codes, scale = quantize_weight(w, 4)
    tensors = be.prepare_weight(codes, 4)
    qx = be.quantize(x, ActQuant(4, CLIP, left, right), tensors)
    out = be.matmul(qx, tensors, N, scale, None, torch.float32)
    return unpack_int4_from_int32(qx.q), qx.scale, out


def _reference(x, left, right, w):
    """The CPU math: P1 · (X · P2) in fp32 of the bf16 inputs, the per-token quantizer, the fake-quant linear."""
    p1, p2 = left.t().to(x.dtype).float(), right.to(x.dtype).float()
    y = (p1 @ (x.float().reshape(M, A, B) @ p2)).reshape(M, -1)
    codes, scale = quantize_per_token(y, 4, CLIP)
    out = F.linear(fake_quant_sym(y, 4, clip_ratio=torch.tensor(CLIP)), fake_quant_sym(w, 4, dim=1))
    return codes, scale.reshape(-1), out


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _close_codes(got, want):
    diff = (got.int() - want.int()).abs()
    return int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01  # only ties computed in another order


@pytest.mark.parametrize("convention", [CLIP_CURRENT, CLIP_OLD])
def test_both_clip_conventions_give_the_cpu_reference(convention, caplog):
    ops = variant(convention)()
    with caplog.at_level(logging.WARNING, logger="core.realquant.npu"):
        checks = {c.op: c for c in self_check(ops, "cpu")}
    assert all(c.ok for c in checks.values()) and not caplog.records, [c.line for c in checks.values()]
    assert checks["npu_kronecker_quant"].clip_convention == convention
    case = _case()
    codes, scale, out = _run(ops, *case)
    want_codes, want_scale, want_out = _reference(*case)
    assert _close_codes(codes, want_codes)
    assert torch.allclose(scale, want_scale, rtol=1e-5)
    assert _rel(out, want_out) < 5e-2  # the kernels write bf16
    # the adaptation is what makes it right: the stored clip passed as it is to an older kernel widens the range
    if convention == CLIP_OLD:
        p1, p2 = case[1].t().bfloat16(), case[2].bfloat16()
        _, naive = ops.npu_kronecker_quant(case[0].reshape(M, A, B), p1, p2, clip_ratio=CLIP)
        assert torch.allclose(naive, want_scale / CLIP ** 2, rtol=1e-5)


def test_both_conventions_give_the_same_outputs():
    case = _case(1)
    current = _run(variant(CLIP_CURRENT)(), *case)
    old = _run(variant(CLIP_OLD)(), *case)
    assert _close_codes(current[0], old[0]) and torch.allclose(current[1], old[1], rtol=1e-5)
    assert _rel(current[2], old[2]) < 1e-2


class RaisingKronecker(TorchNpuDouble):
    @classmethod
    def npu_kronecker_quant(cls, *args, **kwargs):
        raise RuntimeError("EZ9999: aclnnFlatQuant failed\nmore lines")


class WrongMatmul(TorchNpuDouble):
    @staticmethod
    def npu_quant_matmul(x1, x2, scale, **kwargs):
        return TorchNpuDouble.npu_quant_matmul(x1, x2, scale * 2, **kwargs)


@pytest.mark.parametrize("double, op, seen", [(RaisingKronecker, "npu_kronecker_quant", "raised RuntimeError: EZ9999"),
                                              (WrongMatmul, "npu_quant_matmul", "differs from the exact")])
def test_an_op_that_raises_or_differs_falls_back_with_one_warning(double, op, seen, caplog, tmp_path, monkeypatch):
    (tmp_path / "version.cfg").write_text("# CANN toolkit\nversion=8.2.RC1\n")
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(tmp_path))  # where the CANN version is read
    ops = module(double, version="2.7.1.broken")
    case = _case(2)
    with caplog.at_level(logging.WARNING, logger="core.realquant.npu"):
        codes, scale, out = _run(ops, *case)
        _run(ops, *case)  # checked once per process: no second warning
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert op in lines[0] and seen in lines[0] and "torch_npu 2.7.1.broken" in lines[0] and "CANN 8.2.RC1" in lines[0]
    assert "portable torch path" in lines[0] and "\n" not in lines[0]
    want_codes, want_scale, want_out = _reference(*case)
    assert _close_codes(codes, want_codes) and torch.allclose(scale, want_scale, rtol=1e-5)
    assert _rel(out, want_out) < 5e-2
    assert [c.op for c in self_check(ops, "cpu") if not c.ok] == [op]


def test_an_older_token_limit_is_found_and_calls_are_chunked_to_it():
    calls = []

    class Older(variant(max_tokens=KRON_OLD_MAX_TOKENS)):
        @classmethod
        def npu_kronecker_quant(cls, x, *args, **kwargs):
            calls.append(x.shape[0])
            return super().npu_kronecker_quant(x, *args, **kwargs)

    ops = Older()
    kron = {c.op: c for c in self_check(ops, "cpu")}["npu_kronecker_quant"]
    assert kron.ok and kron.max_tokens == KRON_OLD_MAX_TOKENS and "8192 tokens" in kron.line
    calls.clear()
    be = NpuBackend(ops=ops)
    codes, _ = quantize_weight(torch.randn(N, A * B), 4)
    tensors = be.prepare_weight(codes, 4)
    eye_a, eye_b = torch.eye(A), torch.eye(B)
    be.quantize(torch.randn(KRON_OLD_MAX_TOKENS + 3, A * B).bfloat16(), ActQuant(4, CLIP, eye_a, eye_b), tensors)
    assert calls == [KRON_OLD_MAX_TOKENS, 3]
