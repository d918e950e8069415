"""The query paths' fast routes give the same answers as the plain ones: direct chunk reads against zarr, the
CPU scan on several threads against one, adaptive MIPS merging against brute force, and the auto index; for each
stored vector type (float16 and int8)."""

import os

import numpy as np
import pytest
import torch

from gist_index import index as gindex
from gist_index.errors import CorruptStoreError
from gist_index.select import scan_top
from gist_index.store import STATUS_OK, STATUS_TRUNCATED, GradientStore, to_stored
from gist_index.subspace import Scorer, build_target


def write_store(path, n=300, dim=32, chunk_rows=64, ckpts=2, seed=0, clusters=8, dtype="float16") -> GradientStore:
    """A small clustered store written through the GradientStore API (some rows without a gradient)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    labels = rng.integers(0, clusters, n)
    store = GradientStore.create(str(path), {"test": seed}, chunk_rows, dim, ckpts, dtype)
    store.set_meta(weights=[1.0] * ckpts, data=[])
    store.resize(n)
    store.write_rows(
        0,
        {
            "ids": np.array([f"r{i}" for i in range(n)], dtype=str),
            "id_hash": np.arange(n, dtype=np.int64),
            "source": np.zeros(n, np.int32),
            "line": np.arange(1, n + 1),
            "n_chars": np.full(n, 10),
        },
    )
    status = np.where(rng.random(n) < 0.05, STATUS_TRUNCATED, STATUS_OK).astype(np.int8)
    for i in range(store.n_chunks):
        a, b = store.chunk_range(i)
        cols = {"status": status[a:b], "n_tokens": np.ones(b - a, np.int32), "n_labels": np.ones(b - a, np.int32)}
        for c in range(ckpts):
            x = centres[labels[a:b]] + rng.standard_normal((b - a, dim))
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            x[status[a:b] != STATUS_OK] = 0
            cols[f"ckpt_{c}/vectors"] = to_stored(x, dtype)
            for k in ("norms", "grad_norms", "loss"):
                cols[f"ckpt_{c}/{k}"] = np.ones(b - a, np.float32)
        store.write_chunk(i, cols)
    store.finalize({"n_rows": n, "n_with_gradient": int((status == STATUS_OK).sum())})
    return GradientStore.open(str(path))


@pytest.fixture(scope="module", params=["float16", "int8"])
def store(tmp_path_factory, request):
    return write_store(tmp_path_factory.mktemp("scan") / "s.gist", dtype=request.param)


def as_unit(raw):
    """Stored rows as float unit rows, computed here (int8 rows rescaled to norm 1)."""
    x = np.asarray(raw, np.float64)
    if raw.dtype == np.int8:
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    return x.astype(np.float32)


def target_for(store, n_subtasks=5, per=3, seed=1):
    rng = np.random.default_rng(seed)
    vecs = [rng.standard_normal((n_subtasks * per, store.dim)) for _ in range(store.n_checkpoints)]
    return build_target(vecs, [f"t{i // per}" for i in range(n_subtasks * per)], [0.3, 0.7][: store.n_checkpoints])


def test_direct_chunk_reads_equal_zarr_reads(store):
    for c in range(store.n_checkpoints):
        arr = store.group[f"ckpt_{c}/vectors"]
        for i in range(store.n_chunks):
            a, b = store.chunk_range(i)
            raw = store._read_chunk(f"ckpt_{c}/vectors", i, b - a)
            assert raw is not None and raw.dtype == np.dtype(store.meta["dtype"]) and raw.shape == (b - a, store.dim)
            np.testing.assert_array_equal(raw, arr[a:b])
            np.testing.assert_allclose(store.vectors(c, a, b), as_unit(arr[a:b]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        store.vectors(0, 10, 100), as_unit(store.group["ckpt_0/vectors"][10:100]), rtol=1e-6, atol=1e-7
    )


def test_direct_chunk_read_detects_a_flipped_byte(tmp_path):
    s = write_store(tmp_path / "c.gist", n=100)
    path = os.path.join(s.path, "ckpt_1", "vectors", "c", "1", "0")
    with open(path, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CorruptStoreError, match="CRC32C"):
        list(s.iter_chunks())


@pytest.mark.parametrize("method", ["gist", "less", "mips"])
def test_scan_on_several_threads_equals_one_thread_and_brute_force(store, method):
    target = target_for(store)
    scorer = Scorer(target, method)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = scan_top(store, scorer, 40, progress=False)
        torch.set_num_threads(3)
        many = scan_top(store, scorer, 40, progress=False)
        assert torch.get_num_threads() == 3  # restored after the scan
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[1], many[1])
    vecs = [torch.from_numpy(store.vectors(c, 0, store.n_rows)) for c in range(store.n_checkpoints)]
    s = scorer.score(vecs)[0].numpy()
    s[store.column("status") != STATUS_OK] = -np.inf
    order = np.lexsort((np.arange(len(s)), -s.astype(np.float64)))[:40]
    np.testing.assert_array_equal(one[0], order)


def test_adaptive_mips_merge_equals_brute_force(store):
    gindex.build_index(store, "Flat", progress=False)
    index = gindex.load_index(store)
    x = np.concatenate([store.vectors(c, 0, store.n_rows) for c in range(store.n_checkpoints)], axis=1)
    ok = store.column("status") == STATUS_OK
    rng = np.random.default_rng(3)
    for n_queries, n in ((1, 10), (7, 50), (20, 120), (40, 250)):
        q = rng.standard_normal((n_queries, x.shape[1])).astype(np.float32)
        best = (x @ q.T).max(axis=1)
        best[~ok] = -np.inf
        rows, scores = gindex.mips_top(index, q, n)
        want = np.lexsort((np.arange(len(best)), -best.astype(np.float64)))[:n]
        assert set(rows.tolist()) == set(want.tolist())
        np.testing.assert_allclose(scores, best[rows], atol=1e-5)
        assert (np.diff(scores) <= 0).all()


def test_ivf_index_search_and_auto_nprobe(tmp_path):
    s = write_store(tmp_path / "ivf.gist", n=2000, dim=32, chunk_rows=256, clusters=16)
    assert gindex.build_index(s, "IVF16,SQ8", progress=False) == "IVF16,SQ8"
    index = gindex.load_index(s)
    assert gindex.ivf_of(index).nlist == 16 and index.ntotal == int((s.column("status") == STATUS_OK).sum())
    assert gindex.auto_nprobe(index, 10) == gindex.NPROBE_MIN
    assert gindex.auto_nprobe(index, 1000) == 16
    target = target_for(s, n_subtasks=4)
    exact, _ = scan_top(s, Scorer(target, "mips"), 100, progress=False)
    rows, _ = gindex.mips_top(index, target.mips_queries(), 100)
    assert len(set(rows.tolist()) & set(exact.tolist())) >= 90


def test_default_factory_by_size():
    assert gindex.default_factory(40, 128) == "Flat"
    assert gindex.default_factory(10_000, 16384) == "Flat"
    assert gindex.default_factory(100_000, 2048) == "IVF256,SQ8"
    assert gindex.default_factory(1_000_000, 2048) == "IVF1024,SQ8"
    assert gindex.default_factory(1_000_000, 16384) == "IVF1024,SQ8"
    assert gindex.default_factory(2_000_000, 16384) == "IVF1024,SQ4"
    assert gindex.default_factory(10_000_000, 16384) == "IVF4096,PQ1024"


def test_int8_rows_keep_the_direction_of_the_unit_vectors():
    """int8 storage: each row scaled to a largest coordinate of 127 and rounded. An inner product with a unit
    query moves by about the rounding step / sqrt(12): for near-Gaussian rows a few percent of the projection's
    noise scale 1/sqrt(d); a row with a few heavy coordinates has a coarser step, and its error grows with it."""
    rng = np.random.default_rng(5)
    d = 4096
    u = rng.standard_normal((200, d)) * rng.uniform(0.1, 10, (200, 1))
    u[100:, :8] *= 20  # the second half: a few heavy coordinates
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    u[7] = 0  # a row without a gradient stays zero
    q = to_stored(u, "int8")
    assert q.dtype == np.int8 and q.nbytes * 2 == to_stored(u, "float16").nbytes
    assert (np.abs(q).max(axis=1)[np.arange(200) != 7] == 127).all() and not q[7].any()
    back = as_unit(q)
    assert np.abs(np.linalg.norm(back[np.arange(200) != 7], axis=1) - 1).max() < 1e-5
    queries = rng.standard_normal((16, d))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    err = np.abs(back @ queries.T - u @ queries.T).max(axis=1)
    step = np.abs(u).max(axis=1) / 127
    assert (err <= 5 * step / np.sqrt(12)).all()
    assert err[:100].max() < 0.05 / np.sqrt(d)  # near-Gaussian rows: 5% of the projection noise scale at most
    assert err[100:].mean() > 3 * err[:100].mean()  # heavy rows: coarser
