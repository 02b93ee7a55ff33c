"""Randomized Hadamard rotations for any width.

A width n = m·2^k gets D·(R_m ⊗ H_2^k): H the normalized Sylvester Hadamard matrix, R_m a small random orthogonal
factor for the odd part (QuaRot and the FlatQuant code use the same idea, e.g. 11008 = 86 × 128), D random signs.
Rotations are built as two Kronecker factors (L, R) of the near-square split core.transforms.kron_factors gives
(576 → 24 × 24, 1536 → 32 × 48, 11008 → 86 × 128), each factor itself of that form, so an online rotation runs as
x·(L ⊗ R) through the same kronecker_matmul (and real-quant kernels) as a FlatQuant transform; the dense matrix
L ⊗ R is the rotation fused into weights offline."""
from __future__ import annotations

import torch

from .transforms import KroneckerTransform, kron_factors


def split_pow2(n: int) -> tuple[int, int]:
    """(m, p) with n = m·p, p the largest power of two dividing n."""
    if n < 1:
        raise ValueError(f"width must be positive, got {n}")
    p = n & -n
    return n // p, p


def sylvester_hadamard(p: int) -> torch.Tensor:
    """The p × p Hadamard matrix (p a power of two) scaled to be orthogonal, in float64."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {p}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.shape[0] ** 0.5


def _random_orthogonal64(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def random_hadamard_factor(n: int, gen: torch.Generator) -> torch.Tensor:
    """D·(R_m ⊗ H_p) for n = m·p (float64, orthogonal): random row signs D, random orthogonal R_m (m odd, m = 1 for
    powers of two), Sylvester H_p."""
    m, p = split_pow2(n)
    core = torch.kron(_random_orthogonal64(m, gen) if m > 1 else torch.ones(1, 1, dtype=torch.float64),
                      sylvester_hadamard(p))
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return signs[:, None] * core


def random_hadamard_factors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R), float64 orthogonal, with L ⊗ R an n × n randomized Hadamard rotation."""
    a, b = kron_factors(n)
    gen = torch.Generator().manual_seed(seed)
    return random_hadamard_factor(a, gen), random_hadamard_factor(b, gen)


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """The dense n × n rotation L ⊗ R (float64), for fusing into weights."""
    left, right = random_hadamard_factors(n, seed)
    return torch.kron(left, right)


class HadamardTransform(KroneckerTransform):
    """A fixed randomized Hadamard rotation x ↦ x·(L ⊗ R) in the form of a frozen KroneckerTransform (no trainable
    factors, no diag): a FlatQuantLinear folds it into its weight (W·(L ⊗ R), the inverse transpose of an orthogonal
    matrix being itself) and runs it online before quantizing its input, and the real-quant conversion exports it
    like a calibrated transform."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__(dim, add_diag=False, seed=seed)
        self.freeze()
        left, right = random_hadamard_factors(dim, seed)
        left, right = left.float(), right.float()
        # P⁻ᵀ of the stored fp32 factors, computed in float64 (as freeze() does), so folding undoes exactly them
        for name, t in (("m_left", left), ("m_right", right), ("m_left_inv_t", torch.linalg.inv(left.double()).t()),
                        ("m_right_inv_t", torch.linalg.inv(right.double()).t())):
            setattr(self, name, t.float().contiguous())

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hadamard=({self.left_size}) ⊗ ({self.right_size})"
