"""The persistent FAISS index of a store, and maximum-inner-product search over it.

The index holds, for each example with a gradient, the concatenation of its unit vectors at every checkpoint
(``n_checkpoints * dim`` values), under its row number. A MIPS query is a target direction per sub-task
(see :meth:`gist_index.subspace.Target.mips_queries`); the best rows of ``max_s <x, q_s>`` are the union of the
per-sub-task top lists, so merging ``k`` neighbours per sub-task is exact for an exact index.

Index types are FAISS factory strings. ``auto`` picks by size: ``Flat`` (exact) while the float32 index fits
in 1 GiB, ``SQ8`` (one byte per value) up to 16 GiB, beyond that ``IVF<n>,PQ<m>``. Searches with more than 2048
neighbours (FAISS's GPU limit) always run on the CPU index.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile

import numpy as np

from .errors import ConfigError, CorruptStoreError, StoreError
from .progress import bar as progress_bar
from .store import STATUS_OK, GradientStore, fsync_dir

log = logging.getLogger(__name__)
INDEX_FILE = os.path.join("faiss", "index.faiss")


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ConfigError("faiss is not installed (pip install faiss-cpu)") from exc
    return faiss


def default_factory(n_rows: int, dim: int) -> str:
    """The ``auto`` index type for ``n_rows`` vectors of ``dim`` values."""
    if n_rows * dim * 4 <= 1 << 30:
        return "Flat"
    if n_rows * dim <= 16 << 30:
        return "SQ8"
    nlist = 1 << int(round(math.log2(max(64, 4 * math.sqrt(n_rows)))))
    m = next(m for m in (dim // 16, dim // 8, dim // 4, dim // 2, dim) if m >= 1 and dim % m == 0 and m <= 2048)
    return f"IVF{nlist},PQ{m}"


def _stacked(vecs: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(vecs, axis=1), dtype=np.float32)


def _training_sample(store: GradientStore, n_max: int) -> np.ndarray:
    """Up to ``n_max`` valid rows spread evenly over the store's chunks."""
    per_chunk = max(1, -(-n_max // max(1, store.n_chunks)))
    parts = []
    for _, _, vecs, valid in store.iter_chunks():
        x = _stacked(vecs)[valid]
        if len(x):
            sel = np.linspace(0, len(x) - 1, min(per_chunk, len(x))).astype(np.int64)
            parts.append(x[sel])
    return np.concatenate(parts)[:n_max] if parts else np.zeros((0, store.dim * store.n_checkpoints), np.float32)


def build_index(store: GradientStore, factory: str = "auto", progress: bool = True, start_row: int = 0) -> str | None:
    """Build (or, from ``start_row`` on, extend) the store's FAISS index; write it atomically. Returns the factory."""
    faiss = _faiss()
    if factory == "none":
        return None
    D = store.dim * store.n_checkpoints
    path = os.path.join(store.path, INDEX_FILE)
    index = None
    if start_row > 0 and os.path.isfile(path):
        index = faiss.read_index(path)
        try:
            index.remove_ids(faiss.IDSelectorRange(start_row, store.n_rows + 1))
            factory = store.meta.get("summary", {}).get("index_factory", factory)
        except RuntimeError:
            index, start_row = None, 0
    if index is None:
        start_row = 0
        if factory == "auto":
            factory = default_factory(store.n_rows, D)
        try:
            index = faiss.index_factory(
                D, factory if factory.startswith("IVF") else "IDMap2," + factory, faiss.METRIC_INNER_PRODUCT
            )
        except RuntimeError as exc:
            raise ConfigError(f"FAISS cannot build index {factory!r}: {exc}".splitlines()[0]) from None
        if not index.is_trained:
            sample = _training_sample(store, max(50_000, 64 * 256))
            log.info("training FAISS index %s on %d vectors", factory, len(sample))
            index.train(sample)
    first = start_row // store.chunk_rows
    chunks = range(first, store.n_chunks)
    for start, stop, vecs, valid in progress_bar(
        store.iter_chunks(chunks), total=len(chunks), desc="index", enabled=progress
    ):
        rows = np.arange(start, stop, dtype=np.int64)
        keep = valid & (rows >= start_row)
        if keep.any():
            index.add_with_ids(_stacked(vecs)[keep], rows[keep])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".partial")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    fsync_dir(os.path.dirname(path))
    return factory


def load_index(store: GradientStore):
    """Read the store's FAISS index (refusing a missing one)."""
    faiss = _faiss()
    path = os.path.join(store.path, INDEX_FILE)
    if not os.path.isfile(path):
        raise StoreError(f"{store.path}: the store has no FAISS index (it was built with --index none)")
    try:
        return faiss.read_index(path)
    except RuntimeError as exc:
        raise CorruptStoreError(f"{path}: FAISS index does not load ({str(exc).splitlines()[0]})") from None


def search(index, queries: np.ndarray, k: int, nprobe: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products per query: (scores [q, k], rows [q, k]); missing neighbours have row -1."""
    faiss = _faiss()
    if nprobe > 0:
        with contextlib.suppress(Exception):
            faiss.extract_index_ivf(index).nprobe = nprobe
    k = max(1, min(k, index.ntotal))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def mips_top(
    index, queries: np.ndarray, n: int, candidates: float = 1.0, nprobe: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` rows with the highest ``max_q <x, q>`` (merging per-query top lists): (rows, scores), best first."""
    k = int(math.ceil(n * candidates))
    scores, rows = search(index, queries, k, nprobe)
    best: dict[int, float] = {}
    for r, s in zip(rows.ravel().tolist(), scores.ravel().tolist()):
        if r >= 0 and s > best.get(r, -math.inf):
            best[r] = s
    items = sorted(best.items(), key=lambda t: (-t[1], t[0]))[:n]
    return np.array([r for r, _ in items], dtype=np.int64), np.array([s for _, s in items], dtype=np.float32)


def valid_rows(store: GradientStore) -> int:
    """Number of rows with a gradient."""
    return int((store.column("status") == STATUS_OK).sum())
