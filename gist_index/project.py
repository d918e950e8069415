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
* ``identity`` (``--dim 0``): the raw gradient, for small adapters and exactness checks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from .errors import ConfigError

_M32 = 0xFFFFFFFF


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

    @abstractmethod
    def project_into(self, out: torch.Tensor, block: torch.Tensor, offset: int) -> None:
        """Add the projection of coordinates ``offset .. offset+block.shape[1]`` (``block``: [b, n]) to ``out``."""

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Project whole gradients ``[b, source_dim]`` to ``[b, dim]`` (float32)."""
        if grads.dim() == 1:
            return self.project(grads[None])[0]
        if grads.shape[1] != self.source_dim:
            raise ConfigError(f"projection expects {self.source_dim} coordinates, got {grads.shape[1]}")
        out = torch.zeros(grads.shape[0], self.dim, dtype=torch.float32, device=grads.device)
        self.project_into(out, grads.float(), 0)
        return out


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


PROJECTORS = {
    cls.kind: cls for cls in (IdentityProjector, CountSketchProjector, GaussianProjector, RademacherProjector)
}


def make_projector(kind: str, source_dim: int, dim: int, seed: int = 0) -> Projector:
    """Build a projector by name; ``dim == 0`` always means identity."""
    if dim == 0 or kind == "identity":
        return IdentityProjector(source_dim)
    if kind not in PROJECTORS:
        raise ConfigError(f"unknown projection {kind!r} (choose from {', '.join(sorted(PROJECTORS))})")
    return PROJECTORS[kind](source_dim, dim, seed)


def projector_from_spec(spec: dict) -> Projector:
    """Rebuild the projector a store was built with."""
    return make_projector(spec["kind"], spec["source_dim"], spec["dim"], spec["seed"])
