"""Kronecker-factored invertible transforms P = P1 ⊗ P2, each factor parametrized as U·diag(s)·Vᵀ (U, V orthogonal),
so that the inverse is exact and cheap: P⁻ᵀ = U·diag(1/s)·Vᵀ."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import kernels as native_kernels


def kron_factors(n: int) -> tuple[int, int]:
    """a·b = n with a ≤ b as near-square as possible: 4096→(64,64), 11008→(86,128), 576→(24,24), 1536→(32,48)."""
    for a in range(int(math.isqrt(n)), 0, -1):
        if n % a == 0:
            return a, n // a
    return 1, n


# Up to this many rows (decode steps), without autograd on CPU, the native serial kernel runs the transform: two
# torch matmuls would cost more in thread wake-ups than in arithmetic. Fake- and real-quant models both come here, so
# they compute the same sums in the same order.
SMALL_ROWS = 16


def kronecker_matmul(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x·(left ⊗ right) without forming the Kronecker product: reshape each row to (a, b), return leftᵀ·X·right."""
    a, b = left.shape[0], right.shape[0]
    shape = x.shape
    rows = x.numel() // max(a * b, 1)
    if rows <= SMALL_ROWS and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) \
            and not (torch.is_grad_enabled() and (x.requires_grad or left.requires_grad or right.requires_grad)):
        kernels = native_kernels.load()  # built on first use, then cached
        if kernels is not None:
            return kernels.kron(x.reshape(rows, a * b), left, right).reshape(shape)
    x = x.reshape(-1, a, b)
    x = torch.matmul(torch.matmul(left.t(), x), right)
    return x.reshape(shape)


class _DivideColumns(torch.autograd.Function):
    """weight / d, d one scale per input channel (column), with autograd's own gradient formulas evaluated in one
    weight-sized temporary instead of four: the diag's gradient -grad·((W / d) / d) summed over rows, which for a
    7B layer's [4096, 11008] weight is ~0.5 GiB less at the peak of training. Same values, same order."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, d)
        return weight / d

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, d = ctx.saved_tensors
        grad_weight = grad / d if ctx.needs_input_grad[0] else None
        grad_d = None
        if ctx.needs_input_grad[1]:
            if grad.is_contiguous() and weight.is_contiguous():
                t = weight / d
                t.div_(d).mul_(grad).neg_()  # -(g·t) == (-g)·t exactly, in the same (contiguous) layout
            else:  # the reduction order follows the layout: keep autograd's exact expression
                t = -grad * ((weight / d) / d)
            grad_d = t.sum_to_size(d.shape)
        return grad_weight, grad_d


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class OrthogonalFactor(nn.Module):
    """Q = Q0 · cayley(A): Q0 a fixed random orthogonal start, A a learnable skew-symmetric generator (A=0 at start)."""

    def __init__(self, n: int, generator: torch.Generator):
        super().__init__()
        self.register_buffer("base", random_orthogonal(n, generator))
        self.skew = nn.Parameter(torch.zeros(n, n))

    def forward(self) -> torch.Tensor:
        a = self.skew - self.skew.t()
        eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
        # Cayley map (I - A)^-1 (I + A) is orthogonal for any skew-symmetric A.
        return self.base @ torch.linalg.solve(eye - a, eye + a)


class SVDFactor(nn.Module):
    """One invertible factor M = U·diag(s)·Vᵀ."""

    def __init__(self, n: int, generator: torch.Generator):
        super().__init__()
        self.u = OrthogonalFactor(n, generator)
        self.v = OrthogonalFactor(n, generator)
        self.s = nn.Parameter(torch.ones(n))

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, M⁻ᵀ)."""
        u, v = self.u(), self.v()
        return (u * self.s) @ v.t(), (u / self.s) @ v.t()


class KroneckerTransform(nn.Module):
    """x ↦ (x ⊙ d)·(P1 ⊗ P2), with an optional per-channel scale d (add_diag). ``transform_weight`` gives the
    weight that undoes it: W ↦ (W ⊘ d)·(P1 ⊗ P2)⁻ᵀ, so that linear(x', W') == linear(x, W).

    After ``freeze()`` the matrices are fixed buffers (the form used for inference and saved files)."""

    def __init__(self, dim: int, add_diag: bool = False, seed: int = 0):
        super().__init__()
        self.dim = dim
        self.left_size, self.right_size = kron_factors(dim)
        gen = torch.Generator().manual_seed(seed)
        self.left = SVDFactor(self.left_size, gen)
        self.right = SVDFactor(self.right_size, gen)
        self.diag = nn.Parameter(torch.ones(dim)) if add_diag else None
        self.use_diag = add_diag  # False once d is folded into the previous RMSNorm or linear
        self.frozen = False
        self._cached: Optional[tuple] = None  # matrices of the current training step (see cache_matrices)

    def cache_matrices(self, enabled: bool) -> None:
        """While training, compute the four matrices once per step: every q/k/v/up/gate weight and the
        activations share them (saves most of the small solves and matmuls)."""
        self._cached = None
        if enabled and not self.frozen:
            l, l_it = self.left.matrices()
            r, r_it = self.right.matrices()
            self._cached = (l, r, l_it, r_it)

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P1, P2, P1⁻ᵀ, P2⁻ᵀ)."""
        if self.frozen:
            return self.m_left, self.m_right, self.m_left_inv_t, self.m_right_inv_t
        if self._cached is not None:
            return self._cached
        l, l_it = self.left.matrices()
        r, r_it = self.right.matrices()
        return l, r, l_it, r_it

    def forward(self, x: torch.Tensor, apply_diag: Optional[bool] = None) -> torch.Tensor:
        if self.diag is not None and (self.use_diag if apply_diag is None else apply_diag):
            x = x * self.diag.to(x.dtype)
        l, r, _, _ = self.matrices()
        return kronecker_matmul(x, l.to(x.dtype), r.to(x.dtype))

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W·diag(1/d)·P⁻ᵀ for an [out, in] weight (always includes d: the weight sees the unscaled input)."""
        if self.diag is not None:
            weight = _DivideColumns.apply(weight, self.diag.to(weight.dtype))
        _, _, l_it, r_it = self.matrices()
        return kronecker_matmul(weight, l_it.to(weight.dtype), r_it.to(weight.dtype))

    @torch.no_grad()
    def freeze(self) -> None:
        """Compute the matrices once in float64 and keep them as buffers; drop the trainable factors."""
        if self.frozen:
            return
        self._cached = None
        self.double()
        l, r, _, _ = self.matrices()
        self.float()
        l, r = l.float(), r.float()
        # Invert the stored (fp32) matrices in float64, so P⁻ᵀ undoes exactly the P that runs online.
        l_it, r_it = torch.linalg.inv(l.double()).t(), torch.linalg.inv(r.double()).t()
        for name, t in (("m_left", l), ("m_right", r), ("m_left_inv_t", l_it), ("m_right_inv_t", r_it)):
            self.register_buffer(name, t.float().contiguous())
        del self.left, self.right
        self.frozen = True

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kron=({self.left_size}x{self.left_size}) ⊗ ({self.right_size}x{self.right_size}), " \
               f"diag={self.diag is not None}, frozen={self.frozen}"
