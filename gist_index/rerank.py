"""Exact re-ranking: the best candidates of a projected store, re-scored on unprojected gradients.

A store holds randomly projected gradients, so its scores approximate the paper's (benchmarks/README.md measures
by how much). ``select --rerank R`` takes the best ``R x N`` rows of the scan (or the index) as candidates,
recomputes their gradients from the model at every checkpoint, and scores them exactly; the best ``N`` of them
are the selection. It is exact for every example whose projected score put it among the candidates, and costs
``R x N`` forward+backward passes per checkpoint instead of the whole pool's (as the official GIST code does per
target).

No candidate gradient is ever kept at full size. The target's raw validation gradients ``V`` ([n_val, D]) span
all GIST needs: with ``V V^T = P S^2 P^T`` (eigendecomposition of the Gram matrix, the official code's route) and
``Q = V^T P S^-1`` an orthonormal basis of that span, an example's gradient ``g`` enters through ``Q^T g =
S^-1 P^T (V g)`` and, for cosines with the whole gradient, the norm of the rest, ``sqrt(|g|^2 - |Q^T g|^2)``.
``ValidationProjector`` produces ``V g`` inside the batched extractor (one product per LoRA block), so each
candidate costs ``n_val`` numbers per checkpoint. In those coordinates (``[Q^T g, rest]``, the validation rows
``[P S, 0]``) every score of :mod:`gist_index.subspace` equals the score on raw gradients: the frame is an
isometry on everything the formulas use.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from .build import iter_chunk_examples
from .config import DEFAULT_ENERGY, DEFAULT_MAX_RANK
from .data import encode
from .extract import CheckpointedModel
from .progress import bar as progress_bar
from .project import IdentityProjector, Projector
from .store import GradientStore
from .subspace import Scorer, Target, best_first, build_target, numerical_rank, round_robin

log = logging.getLogger(__name__)


class ValidationProjector(Projector):
    """Inner products with fixed rows (the raw validation gradients ``V``): ``g -> V g``."""

    kind = "validation"

    def __init__(self, rows: torch.Tensor):
        super().__init__(rows.shape[1], rows.shape[0])
        self.rows = rows

    def project_into(self, out, block, offset):
        """Add ``block @ V[:, offset:offset+n].T``."""
        out += block @ self.rows[:, offset : offset + block.shape[1]].T


class ExactFrame:
    """One checkpoint's orthonormal frame of the validation span (see the module docstring)."""

    def __init__(self, val: np.ndarray):
        gram = np.asarray(val, np.float64) @ np.asarray(val, np.float64).T
        w, p = np.linalg.eigh(gram)
        order = np.argsort(w)[::-1]
        s = np.sqrt(np.clip(w[order], 0.0, None))
        r = numerical_rank(s)  # the rank subspace.choose_rank caps k at, on the singular values of V
        self.p = p[:, order[:r]]
        self.s = s[:r]
        self.to_frame = (self.p / self.s).T  # [r, n_val]: V g -> Q^T g

    def validation_coords(self) -> np.ndarray:
        """The validation gradients in the frame: ``[P S, 0]`` ([n_val, r + 1])."""
        return np.concatenate([self.p * self.s, np.zeros((len(self.p), 1))], axis=1)

    def coords(self, vg: np.ndarray, norms: np.ndarray) -> np.ndarray:
        """Examples in the frame from ``V g`` ([b, n_val]) and ``|g|`` ([b]): ``[Q^T g, rest]``."""
        inside = np.asarray(vg, np.float64) @ self.to_frame.T
        rest = np.sqrt(np.clip(np.asarray(norms, np.float64) ** 2 - (inside**2).sum(1), 0.0, None))
        return np.concatenate([inside, rest[:, None]], axis=1)


def raw_validation(cm: CheckpointedModel, encoded: Sequence, c: int, batch_size: int) -> np.ndarray:
    """Unprojected SGD gradients of the validation examples at checkpoint ``c`` ([n_val, D] float32)."""
    log.info(
        "rerank: raw validation gradients at checkpoint %d, %d x %d floats (%.2f GB)",
        c,
        len(encoded),
        cm.source_dim,
        len(encoded) * cm.source_dim * 4 / 1e9,
    )
    return cm.gradients(encoded, c, IdentityProjector(cm.source_dim), "sgd", batch_size)["vectors"]


def candidate_examples(store: GradientStore, rows: np.ndarray, eos: str, max_length: int, tokenizer):
    """Yield the encoded examples of the candidate ``rows`` (sorted), chunk by chunk, in row order. Read again for
    each checkpoint: keeping every candidate's tokens instead would grow with the pool."""
    chunks = sorted({int(r) // store.chunk_rows for r in rows})
    for c, examples in iter_chunk_examples(store, chunks, eos):
        lo, hi = store.chunk_range(c)
        yield [encode(examples[int(r) - lo], tokenizer, max_length) for r in rows[(rows >= lo) & (rows < hi)]]


def rerank(
    store: GradientStore,
    cm: CheckpointedModel,
    val_encoded: Sequence,
    subtasks: Sequence[str | None],
    candidates: np.ndarray,
    n: int,
    method: str,
    weights: Sequence[float],
    rank: int | None = None,
    energy: float = DEFAULT_ENERGY,
    max_rank: int = DEFAULT_MAX_RANK,
    batch_size: int = 16,
    progress: bool = True,
    subtask_rule: str = "max",
    unit_val: bool = False,
) -> tuple[np.ndarray, np.ndarray, Target, np.ndarray]:
    """The best ``n`` of ``candidates`` (store rows) by ``method``'s score on unprojected gradients: (rows,
    scores) best first, the exact target (its rank chosen from the exact spectrum unless ``rank`` is given), and
    the sub-task each row was picked for (its best; round-robin: the one whose turn took it). ``mips`` is scored
    by the objective it approximates, ``gist-full``. With ``subtask_rule`` ``round-robin`` the sub-tasks take
    turns over the candidates ranked by their own exact scores (rows in the order taken). ``unit_val``: as
    :func:`gist_index.subspace.build_target`'s (the frame is an isometry, so unit rows in it are unit gradients)."""
    method = "gist-full" if method == "mips" else method
    cfg = store.meta["config"]["compute"]
    candidates = np.sort(np.asarray(candidates, np.int64))
    n_ck = len(cm.adapters)
    frames, coords = [], []
    bar = progress_bar(total=len(candidates) * n_ck, desc="rerank", unit="ex", enabled=progress)
    for c in range(n_ck):  # one checkpoint at a time: one [n_val, D] matrix in memory
        V = raw_validation(cm, val_encoded, c, batch_size)
        frames.append(ExactFrame(V))
        proj = ValidationProjector(torch.as_tensor(V, device=cm.device))
        parts = []
        for enc in candidate_examples(store, candidates, cm.tokenizer.eos_token, cfg["max_length"], cm.tokenizer):
            res = cm.gradients(enc, c, proj, cfg["gradient"], batch_size, on_batch=bar.update)
            parts.append(frames[c].coords(res["vectors"], res["grad_norm"]))
        coords.append(torch.as_tensor(np.concatenate(parts), dtype=torch.float32))
        del V, proj
    bar.close()
    target = build_target(
        [f.validation_coords() for f in frames],
        subtasks,
        weights,
        rank=rank,
        energy=energy,
        max_rank=max_rank,
        unit_val=unit_val,
    )
    per = Scorer(target, method).subtask_scores(coords).numpy()
    if subtask_rule == "round-robin":
        taken: list[int] = []
        rows, scores = round_robin([best_first(candidates, per[:, j]) for j in range(per.shape[1])], n, taken)
        return rows, scores, target, np.asarray(taken, np.int64)
    rows, scores, best = best_first(candidates, per.max(1), per.argmax(1))
    return rows[:n], scores[:n], target, best[:n]


def n_candidates(factor: float, n: int, n_available: int) -> int:
    """How many candidates ``--rerank factor`` asks for, at most the rows with a gradient."""
    return int(min(n_available, max(n, math.ceil(factor * n))))
