"""Seeded random projections of per-example gradients: the same on every run and on every device.

A projector maps a gradient of ``source_dim`` coordinates to ``dim`` coordinates. Gradients arrive one parameter
block at a time (``project_into(out, block, offset)``), so a full gradient is never materialised and no dense
``source_dim x dim`` matrix is ever built by the default projector:

* ``countsketch`` (default): coordinate ``j`` goes to bucket ``h(j) mod dim`` with sign ``s(j)``, both from a
  32-bit integer hash of ``(seed, j)`` computed in integer arithmetic that is exact on CPU and GPU. Inner
  products are unbiased, with variance ``(|x|^2 |y|^2 + <x,y>^2 - 2 sum_j x_j^2 y_j^2) / dim``: no worse than a
  dense Gaussian projection of the same ``dim``. Cost O(source_dim) per example; the cached hashes take 12 bytes
  per coordinate.
* ``gaussian`` and ``rademacher``: dense matrices generated block-wise from the seed (references, and what LESS
  does); O(source_dim x dim) work per example.
* ``pca``: the pool's own principal directions kept exactly, the rest sketched. ``build`` first computes the
  gradients of a seeded sample of the pool (``--pca-sample`` rows, every checkpoint, unit-normalised rows;
  through a CountSketch to ``PCA_INNER_DIM`` coordinates when the adapter has more), and keeps the top ``rank``
  right singular vectors ``U`` as the basis (stored in the store). A gradient ``x`` is stored as
  ``[U^T x, CountSketch(x - U U^T x)]`` (``rank + (dim - rank)`` coordinates). Inner products are exact on the
  basis and the sketch's noise scales with the residual's norm only, not the whole gradient's: where the
  basis holds most of a gradient's energy (65-75% on the benchmark pools) GIST's top 5% moves much less than
  under a plain CountSketch of the same ``dim`` (benchmarks/README.md, fidelity).
* ``identity`` (``--dim 0``): the raw gradient, for small adapters and exactness checks.

Every projector is linear. A projector may accumulate blocks into a wider buffer (``buffer_dim``) and map the
buffer to its output at the end (``finish``); the others' buffer is the output itself.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

import numpy as np
import torch

from .errors import ConfigError

_M32 = 0xFFFFFFFF
PCA_INNER_DIM = 65536  # a pca projector's basis lives in at most this many (sketched) coordinates


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for 0 <= h < 2**32 in int64 without overflow."""
    lo = h & 0xFFFF
    hi = h >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash_coordinates(seed: int, start: int, count: int, dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets in ``[0, dim)`` and signs in ``{-1, +1}`` of coordinates ``start .. start+count-1``."""
    j = torch.arange(start, start + count, dtype=torch.int64, device=device)
    s = _fmix32(torch.tensor([(seed * 0x9E3779B1) & _M32], dtype=torch.int64, device=device))
    h = _fmix32((j >> 32) ^ s)
    h = _fmix32((j & _M32) ^ h)
    bucket = h % dim
    sign = _fmix32(h ^ 0x5BD1E995) >> 31
    return bucket, 1.0 - 2.0 * sign.to(torch.float32)


def hash_coordinates_numpy(seed: int, start: int, count: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The same hash in plain numpy uint64 arithmetic (an independent reference for tests)."""

    def fmix(h):
        h = h ^ (h >> np.uint64(16))
        h = (h * np.uint64(0x85EBCA6B)) & np.uint64(_M32)
        h = h ^ (h >> np.uint64(13))
        h = (h * np.uint64(0xC2B2AE35)) & np.uint64(_M32)
        return h ^ (h >> np.uint64(16))

    j = np.arange(start, start + count, dtype=np.uint64)
    s = fmix(np.array([(seed * 0x9E3779B1) & _M32], dtype=np.uint64))
    h = fmix((j >> np.uint64(32)) ^ s)
    h = fmix((j & np.uint64(_M32)) ^ h)
    sign = fmix(h ^ np.uint64(0x5BD1E995)) >> np.uint64(31)
    return (h % np.uint64(dim)).astype(np.int64), 1.0 - 2.0 * sign.astype(np.float64)


class Projector(ABC):
    """Maps gradients with ``source_dim`` coordinates to ``dim`` coordinates, linearly and deterministically."""

    kind: str = "abstract"

    def __init__(self, source_dim: int, dim: int, seed: int = 0):
        if source_dim <= 0:
            raise ConfigError(f"projection: source dimension must be positive, got {source_dim}")
        if dim <= 0:
            raise ConfigError(f"projection: target dimension must be positive, got {dim}")
        self.source_dim = int(source_dim)
        self.dim = int(dim)
        self.seed = int(seed)

    def spec(self) -> dict:
        """What identifies this projection (stored in a store's metadata and checked on every query)."""
        return {"kind": self.kind, "dim": self.dim, "seed": self.seed, "source_dim": self.source_dim}

    @property
    def buffer_dim(self) -> int:
        """Width of the buffer ``project_into`` accumulates into (``dim`` unless ``finish`` maps it further)."""
        return self.dim

    @abstractmethod
    def project_into(self, out: torch.Tensor, block: torch.Tensor, offset: int) -> None:
        """Add the projection of coordinates ``offset .. offset+block.shape[1]`` (``block``: [b, n]) to ``out``
        (a ``[b, buffer_dim]`` buffer)."""

    def finish(self, buffer: torch.Tensor) -> torch.Tensor:
        """Map a filled ``[b, buffer_dim]`` buffer to the ``[b, dim]`` projection (the identity by default)."""
        return buffer

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Project whole gradients ``[b, source_dim]`` to ``[b, dim]`` (float32)."""
        if grads.dim() == 1:
            return self.project(grads[None])[0]
        if grads.shape[1] != self.source_dim:
            raise ConfigError(f"projection expects {self.source_dim} coordinates, got {grads.shape[1]}")
        out = torch.zeros(grads.shape[0], self.buffer_dim, dtype=torch.float32, device=grads.device)
        self.project_into(out, grads.float(), 0)
        return self.finish(out)


class IdentityProjector(Projector):
    """No projection: the stored vector is the raw gradient (``--dim 0``)."""

    kind = "identity"

    def __init__(self, source_dim: int, dim: int = 0, seed: int = 0):
        super().__init__(source_dim, source_dim, seed)

    def spec(self) -> dict:
        """Identity is fully described by the source dimension."""
        return {"kind": self.kind, "dim": 0, "seed": 0, "source_dim": self.source_dim}

    def project_into(self, out, block, offset):
        """Copy the block into its coordinates."""
        out[:, offset : offset + block.shape[1]] += block


class CountSketchProjector(Projector):
    """Sparse sign-hash sketch (CountSketch): one signed bucket per coordinate, from an integer hash."""

    kind = "countsketch"

    def __init__(self, source_dim: int, dim: int, seed: int = 0):
        super().__init__(source_dim, dim, seed)
        self._cache: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _hashes(self, offset: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (offset, n, str(device))
        if key not in self._cache:
            self._cache[key] = hash_coordinates(self.seed, offset, n, self.dim, device=device)
        return self._cache[key]

    def project_into(self, out, block, offset):
        """Scatter-add the signed block into its buckets (scatter_add_ along rows: an order of magnitude faster on
        CPU than index_add_ along columns)."""
        bucket, sign = self._hashes(offset, block.shape[1], block.device)
        out.scatter_add_(1, bucket.expand(block.shape[0], -1), block.float() * sign)


class _DenseProjector(Projector):
    """A dense random matrix generated 1024 rows at a time from (seed, row block): never held whole."""

    rows_per_block = 1024

    def _rows(self, block_index: int, device) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + block_index)
        n = min(self.rows_per_block, self.source_dim - block_index * self.rows_per_block)
        return self._sample((n, self.dim), g).to(device)

    def _sample(self, shape, g) -> torch.Tensor:
        raise NotImplementedError

    def project_into(self, out, block, offset):
        """Multiply the block by the matching rows of the matrix, generated as needed."""
        n = block.shape[1]
        r = self.rows_per_block
        pos = offset
        while pos < offset + n:
            b = pos // r
            rows = self._rows(b, block.device)
            lo = pos - b * r
            hi = min(rows.shape[0], offset + n - b * r)
            out += block[:, pos - offset : pos - offset + hi - lo].float() @ rows[lo:hi]
            pos = b * r + hi


class GaussianProjector(_DenseProjector):
    """Dense Gaussian JL matrix with entries N(0, 1/dim)."""

    kind = "gaussian"

    def _sample(self, shape, g):
        return torch.randn(shape, generator=g) / self.dim**0.5


class RademacherProjector(_DenseProjector):
    """Dense Rademacher matrix with entries +-1/sqrt(dim), as TRAK's projector used by LESS."""

    kind = "rademacher"

    def _sample(self, shape, g):
        return (torch.randint(0, 2, shape, generator=g).float() * 2 - 1) / self.dim**0.5


def inner_projector(source_dim: int, seed: int) -> Projector:
    """A pca projector's first stage: the raw gradient, or a CountSketch to ``PCA_INNER_DIM`` coordinates."""
    if source_dim <= PCA_INNER_DIM:
        return IdentityProjector(source_dim)
    return CountSketchProjector(source_dim, PCA_INNER_DIM, seed + 1)


def pca_spec(source_dim: int, dim: int, seed: int, rank: int) -> dict:
    """What identifies a pca projection's settings (its fitted basis is identified by its digest, in the store)."""
    inner = inner_projector(source_dim, seed).dim
    return {"kind": "pca", "dim": dim, "seed": seed, "source_dim": source_dim, "inner_dim": inner, "rank": rank}


def basis_digest(basis: np.ndarray) -> str:
    """What identifies a pca basis: the sha256 of its float32 bytes (16 hex digits)."""
    return hashlib.sha256(np.ascontiguousarray(basis, np.float32).tobytes()).hexdigest()[:16]


def fit_basis(rows: np.ndarray, rank: int, block: int = 8192, device=None) -> np.ndarray:
    """The top ``rank`` right singular vectors ([n_cols, k] float32, orthonormal columns; k at most the rows'
    numerical rank) of ``rows`` with each row scaled to unit norm (zero rows dropped). The SVD goes through the
    ``n_rows x n_rows`` Gram matrix; products in float64, ``block`` columns at a time, on ``device``."""
    # Only float64 blocks of x are made: no float64 copy of the whole sample, and no copy without the zero rows
    # (their coefficients are zero). The row norms are the unscaled Gram matrix's diagonal.
    x = torch.as_tensor(np.asarray(rows), dtype=torch.float32, device=device)
    gram = torch.zeros(len(x), len(x), dtype=torch.float64, device=x.device)
    for j in range(0, x.shape[1], block):
        xb = x[:, j : j + block].double()
        gram += xb @ xb.T
    norms = gram.diagonal().sqrt()
    keep = norms > 0
    if not bool(keep.any()):
        raise ConfigError("pca projection: every sampled gradient is zero; nothing to fit a basis to")
    scale = 1.0 / norms[keep]
    w, q = torch.linalg.eigh(gram[keep][:, keep] * scale[:, None] * scale[None, :])
    w, q = w.flip(0), q.flip(1)
    k = int(min(rank, (w > w[0] * 1e-10).sum()))
    coef = torch.zeros(len(x), k, dtype=torch.float64, device=x.device)
    coef[keep] = q[:, :k] / w[:k].sqrt() * scale[:, None]
    basis = torch.empty(x.shape[1], k, dtype=torch.float32, device=x.device)
    for j in range(0, x.shape[1], block):
        basis[j : j + block] = (x[:, j : j + block].double().T @ coef).float()
    return basis.cpu().numpy()


class PcaProjector(Projector):
    """The pool's principal directions exactly, the rest CountSketched (see the module docstring)."""

    kind = "pca"

    def __init__(self, source_dim: int, dim: int, seed: int = 0, basis: np.ndarray | None = None):
        super().__init__(source_dim, dim, seed)
        self.inner = inner_projector(source_dim, seed)
        if basis is None or basis.ndim != 2 or basis.shape[0] != self.inner.dim:
            shape = None if basis is None else tuple(basis.shape)
            raise ConfigError(f"pca projection: the basis must be [{self.inner.dim}, rank], got {shape}")
        if not 0 < basis.shape[1] < dim:
            raise ConfigError(f"pca projection: rank {basis.shape[1]} must be in [1, {dim - 1}] for --dim {dim}")
        self.basis_np = np.ascontiguousarray(basis, np.float32)
        self.rank = int(basis.shape[1])
        self.residual = CountSketchProjector(self.inner.dim, dim - self.rank, seed)
        self._basis: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def spec(self) -> dict:
        """The settings, with the fitted basis's rank (the basis and its digest live in the store)."""
        return pca_spec(self.source_dim, self.dim, self.seed, self.rank)

    @property
    def buffer_dim(self) -> int:
        """The first stage's width: the raw gradient, or its sketch to ``PCA_INNER_DIM``."""
        return self.inner.dim

    def project_into(self, out, block, offset):
        """The first stage: copy or sketch the block into the buffer."""
        self.inner.project_into(out, block, offset)

    def finish(self, buffer: torch.Tensor) -> torch.Tensor:
        """``[U^T x, CountSketch(x - U U^T x)]``, the second part as ``CountSketch(x) - CountSketch(U) U^T x``
        (one product with ``U`` per example, not two)."""
        key = str(buffer.device)
        if key not in self._basis:
            u = torch.from_numpy(self.basis_np).to(buffer.device)
            bucket, sign = self.residual._hashes(0, self.inner.dim, buffer.device)
            su = torch.zeros(self.residual.dim, self.rank, dtype=torch.float32, device=buffer.device)
            su.index_add_(0, bucket, u * sign[:, None])  # CountSketch of U's columns, row by row of U
            self._basis[key] = (u, su.T.contiguous())  # [inner, k], [k, dim - k]
        u, su = self._basis[key]
        x = buffer.float()
        coords = x @ u
        rest = torch.zeros(x.shape[0], self.residual.dim, dtype=torch.float32, device=x.device)
        self.residual.project_into(rest, x, 0)
        return torch.cat([coords, rest - coords @ su], dim=1)


PROJECTORS = {
    cls.kind: cls for cls in (IdentityProjector, CountSketchProjector, GaussianProjector, RademacherProjector)
}


def make_projector(kind: str, source_dim: int, dim: int, seed: int = 0, basis: np.ndarray | None = None) -> Projector:
    """Build a projector by name; ``dim == 0`` always means identity; ``pca`` needs its fitted ``basis``."""
    if dim == 0 or kind == "identity":
        return IdentityProjector(source_dim)
    if kind == "pca":
        return PcaProjector(source_dim, dim, seed, basis)
    if kind not in PROJECTORS:
        raise ConfigError(f"unknown projection {kind!r} (choose from {', '.join(sorted([*PROJECTORS, 'pca']))})")
    return PROJECTORS[kind](source_dim, dim, seed)


def projector_from_spec(spec: dict, basis: np.ndarray | None = None) -> Projector:
    """Rebuild the projector a store was built with (``pca``: with the store's basis)."""
    return make_projector(spec["kind"], spec["source_dim"], spec["dim"], spec["seed"], basis)
