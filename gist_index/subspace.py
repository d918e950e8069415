"""A target's subspace and scoring rules: GIST (the paper's formula), LESS, and the MIPS query vectors.

For each checkpoint c, with validation gradients ``V_c`` ([n_val, dim]) and sub-task labels:

* GIST: ``V_c = P S Q^T`` (SVD); ``U_c = Q[:, :k]``; the coordinates of sub-task s are the mean of its
  examples' ``V_c U_c`` rows, normalised to ``m_cs``. A training example ``x`` scores
  ``max_s sum_c w_c cos(U_c^T x_c, m_cs)``. With ``unit_val`` (``select --unit-val``, the default) the rows of
  ``V_c`` are first scaled to unit norm, so every validation example weighs alike in the subspace and the means
  (without it, the paper's formula as written, larger gradients pull both towards themselves).
* LESS: ``max_s mean_{j in s} sum_c w_c cos(x_c, v_cj)``.
* GIST-full (``gist-full``): the same subspace and sub-task directions, but the cosine is taken with the whole
  gradient: ``max_s sum_c w_c <x_c / |x_c|, U_c m_cs>``, i.e. the paper's score times ``|U_c^T x_c| / |x_c|``,
  the share of the example's gradient that lies in the target's subspace. With a small k (few validation
  examples) the paper's in-subspace cosine lets an example whose gradient is almost orthogonal to the subspace
  score as high as one inside it (its few in-subspace coordinates point anywhere, and in a projected store they
  are mostly projection noise); this variant discounts such examples. See benchmarks/README.md, quality.py.
* MIPS: the query of sub-task s is ``[w_c U_c m_cs]_c`` (concatenated over checkpoints); the index answers
  ``max_s sum_c w_c <x_c / |x_c|, U_c m_cs>``: ``gist-full``'s score, searched approximately.

The rank k is given, or chosen from the spectrum: the smallest k holding ``energy`` of the squared singular
values (default 1: every direction) and at most ``max_rank`` (default 128), but at least the number of sub-tasks
(so each sub-task can have its own direction) and at least 2 (with k = 1 every cosine is +-1), and at most the
numerical rank.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import DEFAULT_ENERGY, DEFAULT_MAX_RANK
from .errors import ConfigError

log = logging.getLogger(__name__)
METHODS = ("gist", "gist-full", "less", "mips")


def numerical_rank(singular_values: np.ndarray) -> int:
    """How many singular values (descending) are numerically non-zero: s^2 above 1e-10 of the largest's.
    Raises ConfigError when all are zero."""
    s2 = np.asarray(singular_values, dtype=np.float64) ** 2
    if len(s2) == 0 or s2[0] <= 0:
        raise ConfigError("the validation gradients are all zero: no subspace to select with")
    return int((s2 > s2[0] * 1e-10).sum())


def choose_rank(
    singular_values: np.ndarray, n_subtasks: int, energy: float = DEFAULT_ENERGY, max_rank: int = DEFAULT_MAX_RANK
) -> int:
    """The automatic rank: see the module docstring."""
    numerical = numerical_rank(singular_values)
    s2 = np.asarray(singular_values, dtype=np.float64) ** 2
    cum = np.cumsum(s2) / s2.sum()
    k = min(int(np.searchsorted(cum, energy - 1e-12) + 1), max_rank)
    return int(max(1, min(numerical, max(k, n_subtasks, 2))))


def group_subtasks(subtasks: Sequence[str | None]) -> tuple[list[str], np.ndarray]:
    """Sub-task names in order of first appearance and each example's sub-task index (None: one sub-task)."""
    names: list[str] = []
    idx = []
    for s in subtasks:
        s = "all" if s is None else s
        if s not in names:
            names.append(s)
        idx.append(names.index(s))
    return names, np.asarray(idx, dtype=np.int64)


@dataclass
class CheckpointSubspace:
    """GIST's subspace at one checkpoint."""

    basis: np.ndarray  # [dim, k] orthonormal columns
    directions: np.ndarray  # [n_subtasks, k] unit rows: normalised mean coordinates per sub-task
    singular_values: np.ndarray  # all of them, descending
    less_directions: np.ndarray  # [n_subtasks, dim]: mean of the normalised validation vectors per sub-task

    @property
    def rank(self) -> int:
        """The k in use."""
        return int(self.basis.shape[1])


@dataclass
class Target:
    """Everything needed to score the pool for one target."""

    subtasks: list[str]
    weights: np.ndarray  # [n_checkpoints], summing to 1
    checkpoints: list[CheckpointSubspace] = field(default_factory=list)
    unit_val: bool = False  # validation gradients scaled to unit norm before the SVD and the means

    @property
    def ranks(self) -> list[int]:
        """k per checkpoint."""
        return [c.rank for c in self.checkpoints]

    def energy_captured(self) -> list[float]:
        """Fraction of the squared singular values inside the chosen subspace, per checkpoint."""
        out = []
        for c in self.checkpoints:
            s2 = c.singular_values**2
            out.append(float(s2[: c.rank].sum() / s2.sum()))
        return out

    def mips_queries(self) -> np.ndarray:
        """[n_subtasks, n_checkpoints * dim] query vectors for the FAISS index (see module docstring)."""
        parts = [w * (c.directions @ c.basis.T) for w, c in zip(self.weights, self.checkpoints)]
        return np.concatenate(parts, axis=1).astype(np.float32)


def build_target(
    val_vectors: Sequence[np.ndarray],
    subtasks: Sequence[str | None],
    weights: Sequence[float],
    rank: int | None = None,
    energy: float = DEFAULT_ENERGY,
    max_rank: int = DEFAULT_MAX_RANK,
    unit_val: bool = False,
) -> Target:
    """Build a target from per-checkpoint validation vectors ([n_val, dim] each, unnormalised). With ``unit_val``
    each validation vector is scaled to unit norm first, so the subspace and the sub-task means weigh every
    validation example alike (LESS normalises each too); without it a larger gradient counts more."""
    names, idx = group_subtasks(subtasks)
    w = np.asarray(weights, dtype=np.float64)
    if len(w) != len(val_vectors) or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"checkpoint weights {list(weights)} do not fit {len(val_vectors)} checkpoints")
    target = Target(subtasks=names, weights=w / w.sum(), unit_val=unit_val)
    onehot = np.zeros((len(names), len(idx)))
    onehot[idx, np.arange(len(idx))] = 1.0
    onehot /= onehot.sum(1, keepdims=True)
    for V in val_vectors:
        V = np.asarray(V, dtype=np.float64)
        if unit_val:
            V = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-30)
        _, S, Qt = np.linalg.svd(V, full_matrices=False)
        k = choose_rank(S, len(names), energy, max_rank) if rank is None else int(rank)
        if not 1 <= k <= len(S):
            raise ConfigError(f"--rank {k} is out of range: the target has {len(S)} validation examples")
        basis = Qt[:k].T
        mean = onehot @ (V @ basis)
        norms = np.linalg.norm(mean, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ConfigError("a sub-task's validation gradients vanish inside the subspace; choose a larger --rank")
        vn = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-30)
        target.checkpoints.append(CheckpointSubspace(basis, mean / norms, S, onehot @ vn))
    return target


def best_first(rows: np.ndarray, scores: np.ndarray, *extra: np.ndarray) -> tuple[np.ndarray, ...]:
    """Order by score descending, then row ascending; drop rows without a score (-inf). Arrays in ``extra``
    (one entry per row) follow the same order and are returned after (rows, scores)."""
    order = np.lexsort((rows, -scores.astype(np.float64)))
    order = order[np.isfinite(scores[order])]
    return (rows[order], scores[order], *(e[order] for e in extra))


def round_robin(
    per_subtask: Sequence[tuple[np.ndarray, ...]], n: int, taken_by: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-tasks take turns, in order, each taking its best row not yet taken, until ``n`` rows (or none left).
    ``per_subtask`` holds each sub-task's (rows, scores, ...) best first. Returns (rows, scores) in the order
    taken; a row's score is that of the sub-task that took it, whose index is appended to ``taken_by``."""
    pos = [0] * len(per_subtask)
    taken: set[int] = set()
    rows: list[int] = []
    scores: list[float] = []
    while len(rows) < n:
        moved = False
        for j, (r, s, *_) in enumerate(per_subtask):
            while pos[j] < len(r) and int(r[pos[j]]) in taken:
                pos[j] += 1
            if pos[j] < len(r) and len(rows) < n:
                taken.add(int(r[pos[j]]))
                rows.append(int(r[pos[j]]))
                scores.append(float(s[pos[j]]))
                if taken_by is not None:
                    taken_by.append(j)
                moved = True
        if not moved:
            break
    return np.asarray(rows, dtype=np.int64), np.asarray(scores, dtype=np.float32)


def _pad_columns(a: np.ndarray, multiple: int = 16) -> np.ndarray:
    """``a`` with zero columns appended up to a multiple of ``multiple`` columns."""
    a = np.asarray(a)
    pad = -a.shape[1] % multiple
    return np.ascontiguousarray(np.pad(a, ((0, 0), (0, pad))) if pad else a)


class Scorer:
    """Scores chunks of stored (unit) vectors for one target and method, on a torch device."""

    def __init__(self, target: Target, method: str, device="cpu"):
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
        self.method = method
        self.device = torch.device(device)
        self.weights = [float(w) for w in target.weights]
        self.n_subtasks = len(target.subtasks)
        self._local = threading.local()
        # Matrices get zero columns up to a multiple of 16: the matrix product runs faster (on CPU, k = 122 takes
        # 20% longer than k = 128) and zero columns change nothing (GIST: zero coordinates; others: sliced off).
        t = lambda a: torch.as_tensor(_pad_columns(a), dtype=torch.float32, device=self.device)  # noqa: E731
        if method == "gist":
            self.mats = [t(c.basis) for c in target.checkpoints]
            self.dirs = [t(_pad_columns(c.directions).T) for c in target.checkpoints]
        elif method == "less":
            self.mats = [t(c.less_directions.T) for c in target.checkpoints]
        else:  # gist-full, and mips's objective computed exactly
            self.mats = [t(c.basis @ c.directions.T) for c in target.checkpoints]

    def _float32(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32 on the device (float16 travels and converts there). On the CPU, into a buffer that
        each thread reuses: a fresh one per chunk fragments the heap and the peak RSS creeps up with N."""
        if x.dtype == torch.float32 or self.device.type != "cpu":
            return x.to(self.device, non_blocking=True).to(torch.float32)
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.shape != x.shape:
            buf = self._local.buf = torch.empty(x.shape, dtype=torch.float32)
        return buf.copy_(x)

    def score(self, vectors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [rows] and the best sub-task [rows] for per-checkpoint vectors ([rows, dim] each)."""
        return self.subtask_scores(vectors).max(dim=1)

    def subtask_scores(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """[rows, n_subtasks]: each row's checkpoint-weighted score for every sub-task."""
        total = None
        for c, x in enumerate(vectors):
            x = self._float32(x)
            if self.method == "gist":
                coords = x @ self.mats[c]
                cos = (coords @ self.dirs[c]) / coords.norm(dim=1, keepdim=True).clamp_min(1e-12)
            else:
                x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
                cos = x @ self.mats[c]
            total = cos * self.weights[c] if total is None else total + cos * self.weights[c]
        return total[:, : self.n_subtasks]
