"""Projections: deterministic from the seed, independent of how gradients are split into blocks, and within the
Johnson-Lindenstrauss bound for inner products (CountSketch distorts no more than a dense Gaussian)."""

import numpy as np
import pytest
import torch

from gist_index.errors import ConfigError
from gist_index.project import (
    CountSketchProjector,
    GaussianProjector,
    IdentityProjector,
    RademacherProjector,
    hash_coordinates,
    hash_coordinates_numpy,
    make_projector,
    projector_from_spec,
)


@pytest.mark.parametrize("seed,start", [(0, 0), (7, 123_456), (2**31 - 1, 2**33 + 5)])
def test_hash_matches_numpy_reference(seed, start):
    b, s = hash_coordinates(seed, start, 5000, 8192)
    nb, ns = hash_coordinates_numpy(seed, start, 5000, 8192)
    np.testing.assert_array_equal(b.numpy(), nb)
    np.testing.assert_array_equal(s.numpy(), ns)
    assert 0 <= nb.min() and nb.max() < 8192
    assert abs(ns.mean()) < 0.05  # balanced signs
    counts = np.bincount(nb, minlength=8192)
    assert counts.max() < 10  # spread over the buckets


@pytest.mark.parametrize("cls", [CountSketchProjector, GaussianProjector, RademacherProjector])
def test_projection_is_deterministic_and_block_independent(cls):
    D, d = 3000, 64
    g = torch.randn(4, D, generator=torch.Generator().manual_seed(0))
    whole = cls(D, d, seed=11).project(g)
    again = cls(D, d, seed=11).project(g)
    assert torch.equal(whole, again)
    out = torch.zeros(4, d)
    p = cls(D, d, seed=11)
    for lo, hi in [(0, 5), (5, 1100), (1100, 2049), (2049, 3000)]:
        p.project_into(out, g[:, lo:hi], lo)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
    other = cls(D, d, seed=12).project(g)
    assert not torch.allclose(other, whole)


def _distortion(proj, pairs=300, D=6000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((pairs, D))
    y = 0.6 * x + 0.8 * rng.standard_normal((pairs, D))  # cosine about 0.6
    px = proj.project(torch.from_numpy(x).float()).double().numpy()
    py = proj.project(torch.from_numpy(y).float()).double().numpy()
    true = (x * y).sum(1)
    scale = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return ((px * py).sum(1) - true) / scale


def test_inner_products_within_jl_bound_and_like_a_dense_gaussian():
    d = 512
    cs = _distortion(CountSketchProjector(6000, d, seed=1))
    gauss = _distortion(GaussianProjector(6000, d, seed=1))
    # the variance of a Gaussian JL estimate of <x,y>/|x||y| is (1 + cos^2)/d
    theory = np.sqrt((1 + 0.6**2) / d)
    for err in (cs, gauss):
        assert abs(err.mean()) < 3 * theory / np.sqrt(len(err))  # unbiased
        assert 0.75 * theory < err.std() < 1.25 * theory
        # JL: with probability 1 - delta, |error| <= sqrt(2 (1+cos^2) log(2/delta) / d); delta = 1e-3 here
        assert np.abs(err).max() < np.sqrt(2 * (1 + 0.36) * np.log(2 / 1e-3) / d)
    assert 0.8 < cs.std() / gauss.std() < 1.25


def test_norms_are_preserved_in_expectation():
    x = torch.randn(200, 4000, generator=torch.Generator().manual_seed(3))
    px = CountSketchProjector(4000, 256, seed=5).project(x)
    ratio = (px.norm(dim=1) / x.norm(dim=1)) ** 2
    assert abs(ratio.mean().item() - 1) < 0.03


def test_identity_and_specs():
    x = torch.randn(3, 10)
    ident = make_projector("countsketch", 10, 0)
    assert isinstance(ident, IdentityProjector)
    assert torch.equal(ident.project(x), x)
    p = make_projector("countsketch", 10, 4, seed=9)
    q = projector_from_spec(p.spec())
    assert p.spec() == {"kind": "countsketch", "dim": 4, "seed": 9, "source_dim": 10}
    assert torch.equal(p.project(x), q.project(x))
    with pytest.raises(ConfigError, match="unknown projection"):
        make_projector("fft", 10, 4)
    with pytest.raises(ConfigError, match="expects 10 coordinates"):
        p.project(torch.randn(2, 11))
