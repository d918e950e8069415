"""The pca projection (``build --projection pca``): its formula against numpy, its basis against numpy's SVD, and a
pca store against references computed from batch-size-1 autograd gradients."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from test_select import MAXLEN, _reference_grads, _train_matrix, gist_reference, less_reference

from gist_index import BuildConfig, build, select
from gist_index import info as gist_info
from gist_index.build import projector_of
from gist_index.data import load_examples, read_examples
from gist_index.errors import ConfigError, ConfigMismatchError, CorruptStoreError
from gist_index.extract import CheckpointedModel
from gist_index.project import PcaProjector, fit_basis, hash_coordinates_numpy
from gist_index.store import GradientStore

from conftest import make_records, write_jsonl


def _numpy_countsketch(x: np.ndarray, dim: int, seed: int) -> np.ndarray:
    bucket, sign = hash_coordinates_numpy(seed, 0, x.shape[1], dim)
    out = np.zeros((len(x), dim))
    for j in range(x.shape[1]):
        out[:, bucket[j]] += sign[j] * x[:, j]
    return out


def _orthonormal(rng, n, k):
    return np.linalg.qr(rng.standard_normal((n, k)))[0]


def test_pca_projection_equals_its_numpy_formula():
    rng = np.random.default_rng(0)
    U = _orthonormal(rng, 300, 10)
    x = rng.standard_normal((5, 300))
    p = PcaProjector(300, 40, seed=4, basis=U.astype(np.float32))
    ours = p.project(torch.from_numpy(x).float()).double().numpy()
    coords = x @ U
    ref = np.concatenate([coords, _numpy_countsketch(x - coords @ U.T, 30, 4)], axis=1)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    # blocks added in any split give the same result (the extractor adds one LoRA block at a time)
    buf = torch.zeros(5, p.buffer_dim)
    for a, b in ((0, 120), (120, 121), (121, 300)):
        p.project_into(buf, torch.from_numpy(x[:, a:b]).float(), a)
    np.testing.assert_allclose(p.finish(buf).double().numpy(), ref, rtol=1e-4, atol=1e-4)


def test_inner_products_with_a_vector_in_the_basis_are_exact():
    rng = np.random.default_rng(1)
    U = _orthonormal(rng, 500, 20)
    a = (U @ rng.standard_normal(20))[None]
    b = rng.standard_normal((50, 500))
    p = PcaProjector(500, 64, seed=0, basis=U.astype(np.float32))
    pa, pb = (p.project(torch.from_numpy(v).float()).double().numpy() for v in (a, b))
    np.testing.assert_allclose(pb @ pa[0], b @ a[0], rtol=1e-4, atol=1e-4 * np.abs(b @ a[0]).max())
    # a plain sketch of the same size is far from exact on the same vectors
    ps = _numpy_countsketch(np.concatenate([a, b]), 64, 0)
    assert np.abs(ps[1:] @ ps[0] - b @ a[0]).max() > 10 * np.abs(pb @ pa[0] - b @ a[0]).max()


def test_fit_basis_spans_numpys_top_singular_vectors_of_the_unit_rows():
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((60, 8)) @ rng.standard_normal((8, 200)) * 0.3 + 0.01 * rng.standard_normal((60, 200))
    rows *= rng.uniform(0.1, 10, size=(60, 1))  # norms vary: the fit must not weight rows by them
    rows[7] = 0  # zero rows are dropped
    B = fit_basis(rows, 5)
    assert B.shape == (200, 5)
    np.testing.assert_allclose(B.T @ B, np.eye(5), atol=1e-5)
    unit = np.delete(rows, 7, 0)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    Q = np.linalg.svd(unit, full_matrices=False)[2][:5].T
    np.testing.assert_allclose(B @ B.T, Q @ Q.T, atol=1e-5)
    # the rank is capped by the rows' numerical rank
    assert fit_basis(rows[:3], 50).shape == (200, 3)
    with pytest.raises(ConfigError, match="zero"):
        fit_basis(np.zeros((4, 10)), 2)


def test_pca_settings_are_checked():
    with pytest.raises(ConfigError, match="pca-rank"):
        BuildConfig(projection="pca", dim=64, pca_rank=64)
    with pytest.raises(ConfigError, match="pca-sample"):
        BuildConfig(projection="pca", pca_sample=-1)
    assert BuildConfig(projection="pca", dim=64).resolved_pca_rank == 16
    auto = BuildConfig(projection="pca")
    assert [auto.pca_sample_for(n) for n in (3, 40, 4000, 10**6)] == [1, 10, 1000, 4096]
    assert BuildConfig(projection="pca", pca_sample=1000).pca_sample_for(40) == 40
    with pytest.raises(ConfigError, match="basis"):
        PcaProjector(100, 10, basis=np.zeros((99, 3), np.float32))


@pytest.fixture(scope="module")
def pca_store(tiny_model_dir, tiny_adapters, pool_file, tmp_path_factory):
    """A float32 pca store whose basis spans every pool gradient (the sample is the whole pool, the rank above
    theirs), and the pool's reference gradients."""
    out = str(tmp_path_factory.mktemp("pca") / "pool.gist")
    cfg = BuildConfig(
        dim=128,
        projection="pca",
        pca_rank=100,
        pca_sample=1000,
        dtype="float32",
        max_length=MAXLEN,
        batch_size=7,
        chunk_rows=16,
    )
    build(tiny_model_dir, tiny_adapters, [pool_file], out, cfg, progress=False, checkpoint_weights=[1, 3])
    cm = CheckpointedModel(tiny_model_dir, tiny_adapters, device="cpu")
    pool = list(read_examples(pool_file))
    ref = [_reference_grads(cm, pool, c) for c in range(2)]
    return out, cfg, ref, cm, pool_file


def test_pca_store_rows_are_the_projected_reference_gradients(pca_store):
    out, _, ref, _, _ = pca_store
    store = GradientStore.open(out)
    p = projector_of(store)
    assert store.meta["pca"]["sample"] == 39 and p.rank == 78  # 39 rows with a gradient x 2 checkpoints
    for c in range(2):
        ok, T = _train_matrix(ref[c])
        proj = p.project(torch.from_numpy(T).float()).double().numpy()
        want = proj / np.linalg.norm(proj, axis=1, keepdims=True)
        got = store.vectors(c, 0, store.n_rows)[ok]
        np.testing.assert_allclose(got, want, atol=1e-4)
        # every pool gradient lies in the basis: its sketched residual is (numerically) nothing
        assert np.linalg.norm(proj[:, p.rank :], axis=1).max() < 1e-3 * np.linalg.norm(T, axis=1).min()


@pytest.fixture(scope="module")
def pool_target(tmp_path_factory):
    """A target made of pool examples (6, in 2 sub-tasks): its gradients lie in a spanning basis too."""
    recs = make_records(40, seed=1)  # the pool_file fixture's records
    picked = [dict(recs[i], subtask=("a", "b")[j % 2]) for j, i in enumerate((0, 2, 9, 12, 20, 33))]
    return write_jsonl(tmp_path_factory.mktemp("pool_target") / "val.jsonl", picked)


@pytest.mark.parametrize("method", ["gist", "less"])
def test_on_a_spanning_pca_store_selection_equals_the_formula_on_raw_gradients(
    pca_store, pool_target, tmp_path, method
):
    """Where the basis holds every gradient (pool and target), a pca store loses nothing: GIST's and LESS's
    scores equal the numpy formulas on batch-size-1 raw gradients. (A plain sketch of the same size does not.)"""
    out, _, ref, cm, _ = pca_store
    val = load_examples([pool_target])
    V = [np.stack(_reference_grads(cm, val, c)) for c in range(2)]
    ok, T0 = _train_matrix(ref[0])
    _, T1 = _train_matrix(ref[1])
    subtasks = [e.subtask for e in val]
    if method == "gist":
        want = gist_reference([T0, T1], V, subtasks, [1, 3], k=3)
    else:
        want = less_reference([T0, T1], V, subtasks, [0.25, 0.75])
    scores = str(tmp_path / "scores.npy")
    select(out, [pool_target], None, method=method, rank=3, top=5, scores_out=scores, progress=False)
    np.testing.assert_allclose(np.load(scores)[ok], want, atol=2e-4)


def test_pca_store_selects_and_refuses_other_settings_and_a_changed_basis(pca_store, target_file, tmp_path):
    out, cfg, _, cm, pool = pca_store
    sel = select(out, [target_file], None, method="gist", top=5, progress=False)
    assert len(sel.rows) == 5
    with pytest.raises(ConfigMismatchError, match="pca_rank"):
        build(cm.model_name, cm.adapters, [pool], out, dataclasses.replace(cfg, pca_rank=50), progress=False)
    copy = str(tmp_path / "copy.gist")
    shutil.copytree(out, copy)
    s = GradientStore.open(copy, mode="r+")
    basis = s.group["pca_basis"][:]
    basis[0, 0] += 1.0
    s.group["pca_basis"][:] = basis
    assert any("pca basis" in p for p in GradientStore.open(copy).verify())
    with pytest.raises(CorruptStoreError, match="digest"):
        projector_of(GradientStore.open(copy))


def test_held_out_energy_is_measured_and_a_weak_basis_warns(tiny_model_dir, tiny_adapters, tmp_path, caplog):
    """With 64+ sampled examples every 8th is held out of the fit; the recorded share of their squared norm inside
    the basis equals the one computed here from their unprojected gradients; a rank-1 basis warns."""
    from gist_index.build import pca_sample_rows
    from gist_index.data import encode
    from gist_index.project import IdentityProjector

    pool = write_jsonl(tmp_path / "pool.jsonl", make_records(120, seed=3))
    out = {}
    for rank in (1, 40):
        cfg = BuildConfig(dim=64, projection="pca", pca_rank=rank, pca_sample=80, max_length=MAXLEN, chunk_rows=32)
        out[rank] = str(tmp_path / f"r{rank}.gist")
        with caplog.at_level("WARNING", logger="gist_index.build"):
            build(tiny_model_dir, tiny_adapters, [pool], out[rank], cfg, progress=False)
    warned = [r.getMessage() for r in caplog.records if "countsketch" in r.getMessage()]
    assert len(warned) == 1 and "0." in warned[0]  # only the rank-1 basis
    store = GradientStore.open(out[40])
    info = store.meta["pca"]
    assert gist_info(out[40])["pca"] == info
    assert info["held_out"] == 10 and info["sample"] == 70
    cm = CheckpointedModel(tiny_model_dir, tiny_adapters, device="cpu")
    examples = list(read_examples(pool))
    rows = pca_sample_rows(store.n_rows, 80, 0)[::8]
    enc = [encode(examples[r], cm.tokenizer, MAXLEN) for r in rows]
    G = np.concatenate([cm.gradients(enc, c, IdentityProjector(cm.source_dim))["vectors"] for c in range(2)])
    B = store.pca_basis().astype(np.float64)
    share = (np.linalg.norm(G @ B, axis=1) ** 2 / np.linalg.norm(G, axis=1) ** 2).mean()
    assert info["energy_held_out"] == pytest.approx(share, abs=1e-3)
    assert 0.05 < share < 0.999


def test_a_process_reads_a_stores_basis_once_per_digest(pca_store, monkeypatch):
    """Repeated queries in one process reuse the projector (the basis is not read again); another basis, at the
    same path, is."""
    out = pca_store[0]
    first = projector_of(GradientStore.open(out))

    def no_read(self):
        raise AssertionError("the basis was read again")

    with monkeypatch.context() as m:
        m.setattr(GradientStore, "pca_basis", no_read)
        assert projector_of(GradientStore.open(out)) is first
    store = GradientStore.open(out)
    store.meta = {**store.meta, "pca": {**store.meta["pca"], "digest": "0" * 16}}  # as if rebuilt
    with pytest.raises(CorruptStoreError, match="digest"):
        projector_of(store)
