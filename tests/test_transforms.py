import pytest
import torch

from core.transforms import KroneckerTransform, OrthogonalFactor, kron_factors, kronecker_matmul


@pytest.mark.parametrize("n,expected", [(4096, (64, 64)), (11008, (86, 128)), (576, (24, 24)), (1536, (32, 48)),
                                        (768, (24, 32)), (13, (1, 13))])
def test_kron_factors_near_square(n, expected):
    assert kron_factors(n) == expected


def test_kronecker_matmul_equals_dense_kron():
    left, right = torch.randn(6, 6, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    x = torch.randn(5, 3, 48, dtype=torch.float64)
    dense = x @ torch.kron(left, right)
    assert torch.allclose(kronecker_matmul(x, left, right), dense, atol=1e-10)


def _perturb(t: KroneckerTransform, scale=0.3):
    with torch.no_grad():
        for name, p in t.named_parameters():
            p.add_(scale * torch.randn_like(p)) if "skew" in name else p.mul_(torch.exp(scale * torch.randn_like(p)))


def test_orthogonal_factor_stays_orthogonal():
    f = OrthogonalFactor(12, torch.Generator().manual_seed(0))
    with torch.no_grad():
        f.skew.normal_()
    q = f().double()
    assert torch.allclose(q @ q.t(), torch.eye(12, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("dim", [576, 1536, 64])
def test_transform_is_exactly_invertible(dim):
    """linear(x·diag·P, W·diag⁻¹·P⁻ᵀ) == linear(x, W) for a perturbed (non-orthogonal, non-unit-diag) transform."""
    t = KroneckerTransform(dim, add_diag=True, seed=3).double()
    _perturb(t)
    x, w = torch.randn(7, dim, dtype=torch.float64), torch.randn(11, dim, dtype=torch.float64)
    ref = x @ w.t()
    got = t(x) @ t.transform_weight(w).t()
    # U, V start from fp32-rounded orthogonal bases, so UᵀU = I only to ~1e-7
    assert ((got - ref).norm() / ref.norm()) < 1e-5
    # P⁻ᵀ is really the inverse transpose of P
    l, r, l_it, r_it = t.matrices()
    assert torch.allclose(l.t() @ l_it, torch.eye(l.shape[0], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(r.t() @ r_it, torch.eye(r.shape[0], dtype=torch.float64), atol=1e-5)
    t.freeze()  # frozen: the inverse is computed from the stored matrices themselves
    l, r, l_it, r_it = (m.double() for m in t.matrices())
    assert torch.allclose(l.t() @ l_it, torch.eye(l.shape[0], dtype=torch.float64), atol=1e-6)


def test_freeze_keeps_the_function():
    t = KroneckerTransform(96, add_diag=True, seed=1)
    _perturb(t)
    x = torch.randn(4, 96)
    before = t(x)
    t.freeze()
    assert t.frozen and not any(p.requires_grad and "skew" in n for n, p in t.named_parameters())
    assert torch.allclose(t(x), before, rtol=1e-5, atol=1e-5)


def test_cached_matrices_are_reused_within_a_training_step():
    t = KroneckerTransform(24, add_diag=True, seed=1)
    t.cache_matrices(True)
    first = t.matrices()
    assert all(a is b for a, b in zip(first, t.matrices()))  # one solve per factor per step, shared by every user
    t.cache_matrices(False)
    assert all(torch.equal(a, b) and a is not b for a, b in zip(first, t.matrices()))


def test_weight_diag_gradient_equals_autograds_bit_for_bit():
    """transform_weight's W / d has its own backward (one weight-sized temporary): the same values as autograd's."""
    torch.manual_seed(0)
    t = KroneckerTransform(96, add_diag=True, seed=1)
    with torch.no_grad():
        t.diag.uniform_(0.5, 1.5)
    w = torch.randn(40, 96)
    for grad in (torch.randn(40, 96), torch.randn(96, 40).t()):  # contiguous and not
        got = torch.autograd.grad(t.transform_weight(w), t.diag, grad)[0]
        _, _, l_it, r_it = t.matrices()
        want = torch.autograd.grad(kronecker_matmul(w / t.diag, l_it, r_it), t.diag, grad)[0]
        assert torch.equal(got, want)
