"""The persistent FAISS index of a store, and maximum-inner-product search over it.

The index holds, for each example with a gradient, the concatenation of its unit vectors at every checkpoint
(``n_checkpoints * dim`` values), under its row number. A MIPS query is a target direction per sub-task
(see :meth:`gist_index.subspace.Target.mips_queries`); the best rows of ``max_s <x, q_s>`` are the union of the
per-sub-task top lists, so merging enough neighbours per sub-task is exact for an exact index (:func:`mips_top`
asks each sub-task for its share first, and for more only where the merge shows it is needed).

Index types are FAISS factory strings. ``auto`` picks by size (measured in ``benchmarks/query.py``): ``Flat``
(exact) below 32,768 rows; then ``IVF<nlist>,SQ8`` (one byte per value, ``nlist`` about ``sqrt(rows)``) while
its codes take at most 16 GiB, ``IVF<nlist>,SQ4`` up to 32 GiB, beyond that ``IVF<nlist>,PQ<dim/16>``. A top-5%
selection asks for thousands of neighbours per sub-task: a flat (non-IVF) index then scans every code once per
sub-task, slower than the exact scan of the store, while an IVF index visits only the lists near each query
(``nprobe`` chosen from the number of neighbours asked, see :func:`auto_nprobe`). The index is searched on the
CPU: FAISS's GPU search returns at most 2048 neighbours per query, too few for a top-5% of a large pool; on a GPU
the exact scan (``--method gist``) is the fast path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile

import numpy as np
import torch

from .errors import ConfigError, CorruptStoreError, StoreError
from .progress import bar as progress_bar
from .store import STATUS_OK, GradientStore, fsync_dir, unit_rows

log = logging.getLogger(__name__)
INDEX_FILE = os.path.join("faiss", "index.faiss")
FLAT_MAX_ROWS = 32_768  # below this, auto is Flat (exact); IVF needs about 40 training rows per list
SQ8_MAX_BYTES = 16 << 30  # auto: IVF,SQ8 while its codes (one byte per value) take at most 16 GiB, then SQ4, PQ
NPROBE_FACTOR, NPROBE_MIN = 16, 8  # automatic nprobe: lists holding 16 k rows, at least 8 lists
TRAIN_MIN_ROWS, TRAIN_MAX_BYTES = 16_384, 4 << 30  # training sample: 40 rows per IVF list, at most 4 GiB


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ConfigError("faiss is not installed (pip install faiss-cpu)") from exc
    return faiss


def default_nlist(n_rows: int) -> int:
    """IVF lists for ``n_rows`` vectors: the power of two nearest ``sqrt(n_rows)``, from 64 to 4096."""
    return int(min(4096, max(64, 1 << int(round(math.log2(max(1.0, math.sqrt(n_rows))))))))


def default_factory(n_rows: int, dim: int) -> str:
    """The ``auto`` index type for ``n_rows`` vectors of ``dim`` values (see the module docstring)."""
    if n_rows < FLAT_MAX_ROWS:
        return "Flat"
    nlist = default_nlist(n_rows)
    if n_rows * dim <= SQ8_MAX_BYTES:
        return f"IVF{nlist},SQ8"
    if n_rows * dim <= 2 * SQ8_MAX_BYTES:
        return f"IVF{nlist},SQ4"
    m = next(m for m in (dim // 16, dim // 8, dim // 4, dim // 2, dim) if m >= 1 and dim % m == 0 and m <= 2048)
    return f"IVF{nlist},PQ{m}"


def _has_ivf(factory: str) -> bool:
    """Whether the factory string holds an IVF stage (which keeps the row ids itself, no IDMap2 needed)."""
    return any(part.startswith("IVF") for part in factory.split(","))


def _stacked(vecs: list[np.ndarray], rows: np.ndarray | None = None) -> np.ndarray:
    """Rows (default all) of the per-checkpoint unit vectors side by side, as float32 (converted by torch: numpy
    converts float16 several times slower; int8 rows are rescaled to unit norm per checkpoint)."""
    vecs = [v if rows is None else v[rows] for v in vecs]
    if vecs and vecs[0].dtype == np.int8:
        return np.concatenate([unit_rows(v) for v in vecs], axis=1)
    x = np.concatenate(vecs, axis=1)
    return torch.from_numpy(x).to(torch.float32).numpy() if x.dtype == np.float16 else x.astype(np.float32)


def _training_sample(store: GradientStore, n_max: int) -> np.ndarray:
    """Up to ``n_max`` valid rows spread evenly over the store's chunks."""
    per_chunk = max(1, -(-n_max // max(1, store.n_chunks)))
    parts = []
    for _, _, vecs, valid in store.iter_chunks(dtype=None):
        ok = np.flatnonzero(valid)
        if len(ok):
            parts.append(_stacked(vecs, ok[np.linspace(0, len(ok) - 1, min(per_chunk, len(ok))).astype(np.int64)]))
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
                D, factory if _has_ivf(factory) else "IDMap2," + factory, faiss.METRIC_INNER_PRODUCT
            )
        except RuntimeError as exc:
            raise ConfigError(f"FAISS cannot build index {factory!r}: {exc}".splitlines()[0]) from None
        if not index.is_trained:
            ivf = ivf_of(index)
            # FAISS asks for 39 rows per IVF list, and 39 per PQ centroid (256): more only costs training time
            want = max(TRAIN_MIN_ROWS, 40 * (ivf.nlist if ivf is not None else 0))
            sample = _training_sample(store, min(want, max(TRAIN_MIN_ROWS, TRAIN_MAX_BYTES // (4 * D))))
            log.info("training FAISS index %s on %d vectors", factory, len(sample))
            index.train(sample)
    first = start_row // store.chunk_rows
    chunks = range(first, store.n_chunks)
    for start, stop, vecs, valid in progress_bar(
        store.iter_chunks(chunks, dtype=None), total=len(chunks), desc="index", enabled=progress
    ):
        rows = np.arange(start, stop, dtype=np.int64)
        keep = np.flatnonzero(valid & (rows >= start_row))
        if len(keep):
            index.add_with_ids(_stacked(vecs, keep), rows[keep])
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


def ivf_of(index):
    """The IVF index inside ``index`` (through IDMap, pre-transforms, refinement), or None."""
    with contextlib.suppress(Exception):
        return _faiss().extract_index_ivf(index)
    return None


def auto_nprobe(index, k: int) -> int:
    """IVF lists to visit for ``k`` neighbours per query: enough lists to hold ``NPROBE_FACTOR * k`` rows."""
    ivf = ivf_of(index)
    if ivf is None:
        return 0
    per_list = max(1.0, index.ntotal / ivf.nlist)
    return int(min(ivf.nlist, max(NPROBE_MIN, math.ceil(NPROBE_FACTOR * k / per_list))))


def search(index, queries: np.ndarray, k: int, nprobe: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products per query: (scores [q, k], rows [q, k]); missing neighbours have row -1.

    ``nprobe`` 0 visits :func:`auto_nprobe` lists of an IVF index."""
    k = max(1, min(k, index.ntotal))
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.nprobe = nprobe if nprobe > 0 else auto_nprobe(index, k)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def _merge(rows: np.ndarray, scores: np.ndarray, n: int, query: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """The ``n`` distinct rows with the best scores (each row at its best score): best first, ties lower row;
    with ``query`` (which query returned each entry), also the query of each row's best score."""
    ok = rows >= 0
    rows, scores = rows[ok], scores[ok]
    order = np.lexsort((rows, -scores.astype(np.float64)))
    rows, scores = rows[order], scores[order]
    _, first = np.unique(rows, return_index=True)  # a row's first place in this order is its best score
    keep = np.sort(first)[:n]
    out = (rows[keep].astype(np.int64), scores[keep].astype(np.float32))
    return out if query is None else (*out, query[ok][order][keep].astype(np.int64))


def mips_top(
    index, queries: np.ndarray, n: int, candidates: float = 1.0, nprobe: int = 0, with_query: bool = False
) -> tuple[np.ndarray, ...]:
    """The ``n`` rows with the highest ``max_q <x, q>`` (merging per-query top lists): (rows, scores), best first;
    ``with_query``: also the query of each row's highest product (the sub-task it matches best).

    Each query first fetches ``2 n / len(queries)`` neighbours (its fair share of the merged top ``n``), not
    ``n``; a query whose last neighbour still scores at or above the merged ``n``-th score may hide more rows,
    so it is asked again with 4 times as many, up to ``candidates * n``. The result is the same as fetching
    ``candidates * n`` neighbours per query, at a fraction of the cost (exact for an exact index)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    q = len(queries)
    k_max = max(1, min(int(math.ceil(n * candidates)), index.ntotal))
    k = min(k_max, max(16, int(math.ceil(2 * n / max(1, q)))))
    got_s: list[np.ndarray] = [np.empty(0, np.float32)] * q
    got_r: list[np.ndarray] = [np.empty(0, np.int64)] * q
    todo = np.arange(q)
    while True:
        scores, rows = search(index, queries[todo], k, nprobe)
        for j, i in enumerate(todo):
            got_s[i], got_r[i] = scores[j], rows[j]
        top_r, top_s, top_q = _merge(
            np.concatenate(got_r), np.concatenate(got_s), n, np.repeat(np.arange(q), [len(r) for r in got_r])
        )
        if k >= k_max:
            break
        threshold = top_s[-1] if len(top_s) >= n else -np.inf
        # more rows may hide behind query i only if it returned k rows and its k-th still reaches the threshold
        todo = np.array([i for i in range(q) if got_r[i][-1] >= 0 and got_s[i][-1] >= threshold], dtype=np.int64)
        if not len(todo):
            break
        k = min(k_max, 4 * k)
        log.debug("mips: %d of %d queries need more than their first neighbours; asking for %d", len(todo), q, k)
    return (top_r, top_s, top_q) if with_query else (top_r, top_s)


def mips_per_query(index, queries: np.ndarray, n: int, nprobe: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each query's own top ``n`` rows by inner product: [(rows, scores)] per query, best first (ties: lower row).

    For ``--subtasks round-robin``: a sub-task taking turns can take at most ``n`` rows and skip only rows others
    took, so ``n`` neighbours per query are always enough (exact for an exact index)."""
    scores, rows = search(index, queries, n, nprobe)
    return [_merge(r, s, n) for r, s in zip(rows, scores)]


def valid_rows(store: GradientStore) -> int:
    """Number of rows with a gradient."""
    return int((store.column("status") == STATUS_OK).sum())
