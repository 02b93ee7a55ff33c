import pytest
import torch

from core.quantizer import (ActQuantizer, WeightQuantizer, fake_quant_asym, fake_quant_sym, qmax, quantize_codes,
                            quantize_sym, sym_scale)


def test_int4_per_token_grid_and_error_bound():
    x = torch.randn(16, 64) * torch.linspace(0.1, 10, 16)[:, None]
    y = fake_quant_sym(x, 4, dim=-1)
    scale = x.abs().amax(-1, keepdim=True) / 7
    codes = y / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the int grid
    assert codes.abs().max() <= 7 + 1e-4  # symmetric: absmax maps to ±7
    assert ((y - x).abs() <= scale / 2 + 1e-6).all()  # round-to-nearest error bound


def test_codes_clamp_to_signed_range_with_clipping():
    x = torch.tensor([[-10.0, -1.0, 0.0, 1.0, 10.0]])
    scale = sym_scale(torch.tensor([[5.0]]), 4)
    q = quantize_sym(x, scale, 4)
    assert q.min() == -8 and q.max() == qmax(4) == 7


def test_weight_quantizer_is_per_output_channel_with_clip():
    w = torch.randn(8, 32)
    w[3] *= 100  # one loud channel must not change the others' scales
    wq = WeightQuantizer(8, 4, lwc=True)
    ratio = torch.sigmoid(torch.tensor(4.0))
    out = wq(w)
    for row in (0, 3):
        scale = w[row].abs().max() * ratio / 7
        assert torch.allclose(out[row] / scale, (out[row] / scale).round(), atol=1e-4)
    assert (out[0] - w[0]).abs().max() < w[0].abs().max() * 0.2


def test_ste_gradient_reaches_input_and_clip():
    x = torch.randn(4, 16, requires_grad=True)
    aq = ActQuantizer(4, lac=True)
    aq(x).sum().backward()
    not_max = x.abs() < x.abs().amax(-1, keepdim=True)  # the row max also feeds the scale
    assert torch.allclose(x.grad[not_max], torch.ones_like(x.grad[not_max]))  # straight-through rounding
    assert aq.clip.grad is not None and aq.clip.grad != 0


def test_16_bits_is_identity_and_asym_roundtrip():
    x = torch.randn(3, 10)
    assert fake_quant_sym(x, 16) is x
    y = fake_quant_asym(x + 5, 8)
    assert (y - (x + 5)).abs().max() < ((x + 5).max() - (x + 5).min()) / 255


def _composed_fake_quant(x, bits, clip):
    """fake_quant_sym as plain autograd ops (round_ste inside quantize_sym): the reference for the fused node."""
    q, scale = quantize_codes(x, bits, -1, clip)
    return (q * scale).to(x.dtype)


@pytest.mark.parametrize("shape,clip_shape,dtype", [
    ((5, 300), None, torch.float32),            # per token, no clip: nothing clamps
    ((40, 96), (40, 1), torch.float32),         # per output channel with LWC: some codes clamp
    ((2, 7, 64), (), torch.float32),            # LAC: one clip for the whole tensor
    ((3, 50), (3, 1), torch.bfloat16),
])
def test_fused_fake_quant_has_the_composed_formulas_values_and_gradients(shape, clip_shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    upstream = torch.randn(*shape, generator=g).to(dtype)
    grads = []
    for fn in (fake_quant_sym, _composed_fake_quant):
        xi = x.clone().requires_grad_(True)
        clip = None if clip_shape is None else torch.sigmoid(torch.randn(clip_shape, generator=torch.Generator()
                                                                         .manual_seed(1))).requires_grad_(True)
        out = fn(xi, 4, clip_ratio=clip) if fn is fake_quant_sym else fn(xi, 4, clip)
        (out.float() * upstream.float()).sum().backward()
        grads.append((out.detach(), xi.grad.float(), None if clip is None else clip.grad))
    (out_f, gx_f, gc_f), (out_c, gx_c, gc_c) = grads
    assert torch.equal(out_f, out_c)
    assert torch.allclose(gx_f, gx_c, rtol=1e-5, atol=1e-5 * float(gx_c.abs().max()))
    if gc_c is not None:
        assert torch.allclose(gc_f, gc_c, rtol=1e-5, atol=1e-6 * float(gc_c.abs().max()))


def test_fake_quant_equals_the_integer_codes_times_scale():
    x = torch.randn(6, 40) * 5
    q, scale = quantize_codes(x, 4, -1, None)
    assert torch.equal(fake_quant_sym(x, 4), q * scale)


@pytest.mark.parametrize("a_bits,w_bits,k", [(4, 4, 4096), (8, 4, 1000), (4, 8, 333), (8, 8, 1024), (8, 8, 2501)])
def test_integer_gemm_is_exact_on_the_int8_and_the_fp32_path(monkeypatch, a_bits, w_bits, k):
    """W8A8 beyond K = 1024 (an int8 lm_head) is past one fp32 GEMM's exact range: the fp32 path sums K slices."""
    from core.quantizer import (INT_GEMM_ENV, code_matmul, float_gemm_is_exact, int8_gemm_is_exact, integer_linear,
                                quantize_codes)

    g = torch.Generator().manual_seed(k)
    # worst case for the fp32 sums: every product at its extreme, same sign
    q_x = torch.full((3, k), -(2 ** (a_bits - 1)), dtype=torch.float32)
    q_x[1:] = torch.randint(-(2 ** (a_bits - 1)), 2 ** (a_bits - 1), (2, k), generator=g).float()
    w = torch.full((5, k), -(2 ** (w_bits - 1)), dtype=torch.int8)
    w[1:] = torch.randint(-(2 ** (w_bits - 1)), 2 ** (w_bits - 1), (4, k), generator=g, dtype=torch.int8)
    q_x[2], w[2] = 2 ** (a_bits - 1) - 1, 2 ** (w_bits - 1) - 1  # 8x8 bits, K = 2501: an odd sum > 2^24
    exact = (q_x.double() @ w.double().t())
    assert float_gemm_is_exact(k, a_bits, w_bits) == (k <= 1024 or a_bits + w_bits < 16)
    monkeypatch.setenv(INT_GEMM_ENV, "int")
    as_int = code_matmul(q_x, w, a_bits, w_bits)
    monkeypatch.setenv(INT_GEMM_ENV, "float")
    as_float = code_matmul(q_x, w, a_bits, w_bits)
    # torch._int_mm where it sums these codes exactly (8x8 bits on a CPU without VNNI: it does not; the fp32 path)
    assert (as_int.dtype == torch.int32) == (int8_gemm_is_exact(q_x.device, a_bits, w_bits)
                                             or not float_gemm_is_exact(k, a_bits, w_bits))
    assert as_float.dtype == (torch.float32 if float_gemm_is_exact(k, a_bits, w_bits) else torch.int32)
    if not float_gemm_is_exact(k, a_bits, w_bits):  # the case the slices are for: one fp32 GEMM is off
        assert not torch.equal((q_x @ w.float().t()).double(), exact)
    assert torch.equal(as_int.double(), exact) and torch.equal(as_float.double(), exact)
    # the whole integer linear (quantize, GEMM, epilogue) is bit-identical on both paths
    x = torch.randn(4, k, generator=g) * 3
    w_codes, w_scale = quantize_codes(torch.randn(6, k, generator=g), w_bits, 1)
    bias, outs = torch.randn(6, generator=g), []
    for mode in ("int", "float"):
        monkeypatch.setenv(INT_GEMM_ENV, mode)
        outs.append(integer_linear(x, w_codes, w_scale, bias, a_bits, None, w_bits))
    assert torch.equal(outs[0], outs[1])


def test_fp32_gemm_exactness_bound():
    from core.quantizer import float_gemm_is_exact

    assert float_gemm_is_exact(2 ** 18, 4, 4) and not float_gemm_is_exact(2 ** 18 + 1, 4, 4)
    assert float_gemm_is_exact(2 ** 14, 8, 4) and not float_gemm_is_exact(2 ** 15, 8, 4)


def test_fake_quant_row_blocks_give_the_unblocked_values_and_gradients(monkeypatch):
    """Row blocks (small on cpu, large on accelerators) only bound temporaries: forward and backward unchanged."""
    from core import quantizer

    torch.manual_seed(0)
    x = torch.randn(300, 64)
    clip = torch.tensor([[0.9]] * 300).requires_grad_()
    grad = torch.randn(300, 64)

    def run():
        xx = x.clone().requires_grad_()
        out = quantizer.fake_quant_sym(xx, 4, clip_ratio=clip)
        gx, gc = torch.autograd.grad(out, (xx, clip), grad)
        return out, gx, gc

    monkeypatch.setitem(quantizer.BLOCK_ELEMENTS, "cpu", 1 << 40)
    whole = run()
    monkeypatch.setitem(quantizer.BLOCK_ELEMENTS, "cpu", 640)  # 30 blocks of 10 rows
    for a, b in zip(whole, run()):
        assert torch.equal(a, b)


def test_clip_search_in_row_blocks_picks_the_same_ratios(monkeypatch):
    """WeightQuantizer.init_clip_mse searches a large weight in row blocks (bounded temporaries for a 7B layer): the
    ratios are the ones the whole-tensor search picks, and better than no clip."""
    import core.quantizer as quantizer

    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.rand(300, 1) + torch.randn(300, 200).pow(5) * 0.01  # outliers: clips below 1
    whole = quantizer.WeightQuantizer(300, 4, True)
    whole.init_clip_mse(w)
    monkeypatch.setattr(quantizer, "CLIP_SEARCH_ELEMENTS", 7 * 200)  # 7 rows per block, a ragged last block
    blocked = quantizer.WeightQuantizer(300, 4, True)
    blocked.init_clip_mse(w)
    assert torch.equal(whole.clip, blocked.clip)
    ratio = blocked.clip_ratio()
    assert (ratio < 0.99).any()
    err = ((quantizer.fake_quant_sym(w, 4, dim=1, clip_ratio=ratio) - w) ** 2).sum()
    assert err < ((quantizer.fake_quant_sym(w, 4, dim=1) - w) ** 2).sum()


def test_int8_gemm_is_kept_from_codes_it_would_saturate(monkeypatch):
    """Without VNNI (here: oneDNN capped at AVX2), torch._int_mm's int16 pair sums saturate for 8-bit weights, so
    code_matmul sends those codes to the exact fp32 path even when the int8 GEMM is forced; 4-bit weights stay."""
    from core.quantizer import INT_GEMM_ENV, code_matmul, int8_gemm_is_exact

    cpu = torch.device("cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert int8_gemm_is_exact(cpu, 8, 4) and int8_gemm_is_exact(cpu, 4, 4)
    assert not int8_gemm_is_exact(cpu, 8, 8) and not int8_gemm_is_exact(cpu, 4, 8)
    assert int8_gemm_is_exact(torch.device("meta"), 8, 8)  # not a CPU: cuBLASLt sums exactly
    monkeypatch.setenv(INT_GEMM_ENV, "int")
    q_x = torch.full((2, 300), 7.0)
    w = torch.full((3, 300), 127, dtype=torch.int8)
    out = code_matmul(q_x, w, 4, 8)
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((2, 3), 7.0 * 127 * 300))
    assert code_matmul(q_x, w.clamp(-8, 7), 4, 4).dtype == torch.int32
