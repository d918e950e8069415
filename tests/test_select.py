"""With --dim 0, selection equals a direct numpy implementation of the paper's formula (GIST) and of LESS's,
computed from reference gradients of a batch-size-1 autograd loop."""

import json
import logging

import numpy as np
import pytest

from gist_index import BuildConfig, build, select
from gist_index.data import encode, load_examples, read_examples
from gist_index.extract import CheckpointedModel, collate, reference_gradients

MAXLEN = 128


def _reference_grads(cm, examples, ckpt, adam=False, momentum=True):
    cm.use(ckpt)
    rows = []
    for ex in examples:
        e = encode(ex, cm.tokenizer, MAXLEN)
        if e.n_label_tokens == 0:
            rows.append(None)
            continue
        batch = collate([e], cm.tokenizer.pad_token_id, "cpu")
        state = cm.adam_state(ckpt) if adam else None
        rows.append(reference_gradients(cm.pm, batch, state, momentum)[0].double().numpy())
    return rows


def gist_reference(train, val, subtasks, weights, k, full=False, per_subtask=False, unit_val=True):
    """The paper's formula, the way the official code computes it (Gram matrix eigendecomposition).
    ``full``: the gist-full variant, the in-subspace coordinates divided by the norm of the whole gradient;
    ``per_subtask``: [rows, n_subtasks], before the max over sub-tasks; ``unit_val`` (select's default): each
    validation gradient scaled to unit norm first (False: the formula as written)."""
    names = sorted(set(subtasks), key=subtasks.index)
    w = np.asarray(weights, float) / np.sum(weights)
    acc = 0
    for T, V, wc in zip(train, val, w):
        if unit_val:
            V = V / np.linalg.norm(V, axis=1, keepdims=True)
        lam, vec = np.linalg.eigh(V @ V.T)
        order = np.argsort(lam)[::-1]
        lam, vec = lam[order], vec[:, order]
        S = np.sqrt(np.clip(lam, 0, None))
        U = V.T @ (vec[:, :k] / S[:k])  # right singular vectors, D x k
        val_coords = vec[:, :k] * S[:k]
        means = np.stack([val_coords[[i for i, s in enumerate(subtasks) if s == n]].mean(0) for n in names])
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        coords = T @ U
        coords /= np.linalg.norm(T if full else coords, axis=1, keepdims=True)
        acc = acc + wc * (coords @ means.T)
    return acc if per_subtask else acc.max(1)


def round_robin_reference(scores, n):
    """Sub-tasks take turns in order; each takes the row of its highest score (lowest row on ties) not yet taken."""
    taken = []
    while len(taken) < n:
        for j in range(scores.shape[1]):
            if len(taken) < n:
                free = [r for r in np.lexsort((np.arange(len(scores)), -scores[:, j])) if r not in taken]
                taken.append(int(free[0]))
    return taken


def less_reference(train, val, subtasks, weights):
    """LESS: cosine with each validation example, summed over checkpoints, mean per sub-task, max."""
    names = sorted(set(subtasks), key=subtasks.index)
    acc = 0
    for T, V, wc in zip(train, val, weights):
        Tn = T / np.linalg.norm(T, axis=1, keepdims=True)
        Vn = V / np.linalg.norm(V, axis=1, keepdims=True)
        acc = acc + wc * (Tn @ Vn.T)
    per = np.stack([acc[:, [i for i, s in enumerate(subtasks) if s == n]].mean(1) for n in names], axis=1)
    return per.max(1)


def _stores(model, adapters, pool_file, d, dim, grads=("sgd", "adam")):
    """A store of the pool per gradient type at ``dim`` (0: raw gradients), checkpoint weights 1:3."""
    stores = {}
    for grad in grads:
        cfg = BuildConfig(dim=dim, max_length=MAXLEN, batch_size=7, chunk_rows=16, gradient=grad)
        stores[grad] = str(d / f"{grad}.gist")
        build(model, adapters, [pool_file], stores[grad], cfg, progress=False, checkpoint_weights=[1, 3])
    return stores


@pytest.fixture(scope="module")
def exact(tiny_model_dir, tiny_adapters, pool_file, target_file, tmp_path_factory):
    d = tmp_path_factory.mktemp("exact")
    stores = _stores(tiny_model_dir, tiny_adapters, pool_file, d, dim=0, grads=("sgd", "adam", "rms"))
    cm = CheckpointedModel(tiny_model_dir, tiny_adapters, device="cpu")
    pool = list(read_examples(pool_file))
    val = load_examples([target_file])
    ref = {}
    for grad in ("sgd", "adam", "rms"):
        ref[grad] = [_reference_grads(cm, pool, c, grad != "sgd", grad == "adam") for c in range(2)]
    ref["val"] = [np.stack(_reference_grads(cm, val, c)) for c in range(2)]
    ref["subtasks"] = [e.subtask for e in val]
    return stores, ref, d


def _train_matrix(rows):
    ok = [i for i, r in enumerate(rows) if r is not None]
    return ok, np.stack([rows[i] for i in ok])


@pytest.mark.parametrize("rank", [0, 2, 3])
def test_gist_equals_numpy_paper_formula(exact, target_file, rank):
    stores, ref, d = exact
    out = str(d / f"gist{rank}.jsonl")
    scores_file = str(d / f"gist{rank}.npy")
    sel = select(
        stores["sgd"], [target_file], out, method="gist", rank=rank, top=10, scores_out=scores_file, progress=False
    )
    k = sel.target.ranks[0]
    assert sel.target.ranks == [k, k] and (rank == 0 or k == rank)
    ok, T0 = _train_matrix(ref["sgd"][0])
    _, T1 = _train_matrix(ref["sgd"][1])
    expected = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], k)
    got = np.load(scores_file)
    assert np.isneginf(np.delete(got, ok)).all()  # no gradient, no score
    np.testing.assert_allclose(got[ok], expected, atol=2e-4)
    top = [ok[i] for i in np.argsort(-expected, kind="stable")[:10]]
    assert list(sel.rows) == top
    lines = [json.loads(line) for line in open(out)]
    assert [r["rank"] for r in lines] == list(range(1, 11))
    assert [r["id"] for r in lines] == sel.ids
    assert all("messages" in r or "prompt" in r for r in lines)  # the original records, ready to train on


def test_gist_full_equals_numpy_formula_and_differs_from_gist(exact, target_file):
    stores, ref, d = exact
    scores_file = str(d / "gist-full.npy")
    sel = select(stores["sgd"], [target_file], None, method="gist-full", top=10, scores_out=scores_file, progress=False)
    k = sel.target.ranks[0]
    ok, T0 = _train_matrix(ref["sgd"][0])
    _, T1 = _train_matrix(ref["sgd"][1])
    expected = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], k, full=True)
    got = np.load(scores_file)
    np.testing.assert_allclose(got[ok], expected, atol=2e-4)
    assert list(sel.rows) == [ok[i] for i in np.argsort(-expected, kind="stable")[:10]]
    paper = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], k)
    assert np.abs(paper - expected).max() > 1e-2  # a different score, not the paper's under another name


@pytest.mark.parametrize("unit_val", [True, False], ids=["unit-val", "no-unit-val"])
@pytest.mark.parametrize("rerank", [0, 3])
def test_unit_val_and_the_formula_as_written_equal_the_numpy_reference(exact, target_file, unit_val, rerank):
    """``--unit-val`` (the default): the paper's formula with every validation gradient scaled to unit norm first;
    ``--no-unit-val``: the formula as written. On raw gradients, with or without re-ranking (the re-ranking frame
    must keep the same rule)."""
    stores, ref, d = exact
    scores_file = str(d / f"unit{unit_val}{rerank}.npy")
    sel = select(
        stores["sgd"],
        [target_file],
        None,
        top=10,
        unit_val=unit_val,
        rerank=rerank,
        scores_out=scores_file,
        progress=False,
    )
    ok, T0 = _train_matrix(ref["sgd"][0])
    _, T1 = _train_matrix(ref["sgd"][1])
    k = sel.target.ranks[0]
    expected = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], k, unit_val=unit_val)
    np.testing.assert_allclose(np.load(scores_file)[ok], expected, atol=2e-4)
    top = [ok[i] for i in np.argsort(-expected, kind="stable")[:10]]
    assert list(sel.rows) == top and sel.report()["unit_val"] is unit_val
    np.testing.assert_allclose(sel.scores, np.sort(expected)[::-1][:10], atol=2e-4)
    norms = np.linalg.norm(ref["val"][0], axis=1)
    assert norms.max() > 1.2 * norms.min()  # the validation gradients' norms differ, so the rule matters:
    other = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], k, unit_val=not unit_val)
    assert np.abs(other - expected).max() > 1e-2


@pytest.mark.parametrize("top", [5, 10, 25])
def test_round_robin_equals_numpy_reference(exact, target_file, top):
    stores, ref, d = exact
    out = str(d / f"rr{top}.jsonl")
    scores_file = str(d / f"rr{top}.npy")
    sel = select(
        stores["sgd"],
        [target_file],
        out,
        method="gist",
        subtasks="round-robin",
        top=top,
        scores_out=scores_file,
        progress=False,
    )
    ok, T0 = _train_matrix(ref["sgd"][0])
    _, T1 = _train_matrix(ref["sgd"][1])
    per = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], sel.target.ranks[0], per_subtask=True)
    expected = [ok[i] for i in round_robin_reference(per, top)]
    assert list(sel.rows) == expected
    got = np.load(scores_file)  # every row's best-sub-task score, as with the paper's rule
    assert np.isneginf(np.delete(got, ok)).all()
    np.testing.assert_allclose(got[ok], per.max(1), atol=2e-4)
    assert [json.loads(line)["id"] for line in open(out)] == sel.ids
    by_max = [ok[i] for i in np.argsort(-per.max(1), kind="stable")[:top]]
    if top == 10:  # here the paper's max rule gives one sub-task more than its share: a different selection
        counts = np.bincount(per[[ok.index(r) for r in by_max]].argmax(1), minlength=3)
        assert counts.max() > -(-top // 3) and set(by_max) != set(expected)
    for j, r in enumerate(sel.rows):  # each row's score is its own sub-task's (the one whose turn it was)
        np.testing.assert_allclose(sel.scores[j], per[ok.index(r), j % 3], atol=2e-4)


def test_round_robin_through_the_index_equals_the_numpy_reference(exact, target_file):
    """mips with round-robin: one FAISS query per sub-task; with a Flat index, exactly gist-full's round-robin."""
    stores, ref, d = exact
    sel = select(stores["sgd"], [target_file], None, method="mips", subtasks="round-robin", top=10, progress=False)
    ok, T0 = _train_matrix(ref["sgd"][0])
    _, T1 = _train_matrix(ref["sgd"][1])
    k = sel.target.ranks[0]
    per = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], k, full=True, per_subtask=True)
    assert list(sel.rows) == [ok[i] for i in round_robin_reference(per, 10)]
    for j, r in enumerate(sel.rows):
        np.testing.assert_allclose(sel.scores[j], per[ok.index(r), j % 3], atol=2e-4)
    plain = select(stores["sgd"], [target_file], None, method="mips", top=10, progress=False)
    assert set(plain.rows) != set(sel.rows)  # the max rule picks differently here (else the test shows nothing)


def test_subtasks_rule_is_checked():
    from gist_index.config import SelectConfig
    from gist_index.errors import ConfigError

    with pytest.raises(ConfigError, match="subtasks"):
        SelectConfig(subtasks="mean", top=5)


def test_gist_on_rms_store_equals_paper_formula_on_preconditioned_gradients(exact, target_file):
    """--gradient rms: the pool's gradients preconditioned as LESS's without the momentum term; the validation
    side (the subspace) stays plain, as in LESS."""
    stores, ref, d = exact
    scores_file = str(d / "gist-rms.npy")
    sel = select(stores["rms"], [target_file], None, method="gist", top=10, scores_out=scores_file, progress=False)
    ok, T0 = _train_matrix(ref["rms"][0])
    _, T1 = _train_matrix(ref["rms"][1])
    expected = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], sel.target.ranks[0])
    np.testing.assert_allclose(np.load(scores_file)[ok], expected, atol=2e-4)
    assert list(sel.rows) == [ok[i] for i in np.argsort(-expected, kind="stable")[:10]]
    _, S0 = _train_matrix(ref["sgd"][0])
    _, S1 = _train_matrix(ref["sgd"][1])
    plain = gist_reference([S0, S1], ref["val"], ref["subtasks"], [1, 3], sel.target.ranks[0])
    assert np.abs(plain - expected).max() > 0.05  # the preconditioning changes the scores


def test_less_equals_less_formula_on_adam_store(exact, target_file):
    stores, ref, d = exact
    scores_file = str(d / "less.npy")
    sel = select(
        stores["adam"],
        [target_file],
        str(d / "less.jsonl"),
        method="less",
        fraction=0.25,
        scores_out=scores_file,
        progress=False,
    )
    ok, T0 = _train_matrix(ref["adam"][0])
    _, T1 = _train_matrix(ref["adam"][1])
    expected = less_reference([T0, T1], ref["val"], ref["subtasks"], [0.25, 0.75])
    got = np.load(scores_file)
    np.testing.assert_allclose(got[ok], expected, atol=2e-4)
    assert len(sel.rows) == round(0.25 * len(ok))
    assert list(sel.rows) == [ok[i] for i in np.argsort(-expected, kind="stable")[: len(sel.rows)]]


def test_mips_with_flat_index_equals_exact_scan_of_its_objective(exact, target_file):
    stores, _, d = exact
    from gist_index.select import open_for_query, scan_top
    from gist_index.subspace import Scorer

    mips = select(stores["sgd"], [target_file], None, method="mips", top=8, progress=False)
    store = open_for_query(stores["sgd"])
    assert store.meta["summary"]["index_factory"] == "Flat"
    rows, scores = scan_top(store, Scorer(mips.target, "mips"), 8, progress=False)
    assert list(mips.rows) == list(rows)
    np.testing.assert_allclose(mips.scores, scores, atol=1e-5)


def test_truncated_examples_are_reported_and_never_selected(exact, pool_file, target_file):
    stores, _, d = exact
    from gist_index import info

    meta = info(stores["sgd"])
    assert meta["n_truncated"] >= 1
    from gist_index.store import GradientStore

    s = GradientStore.open(stores["sgd"])
    assert "too-long" in s.meta["summary"]["truncated_ids"]
    sel = select(stores["sgd"], [target_file], None, fraction=1.0, progress=False)
    assert "too-long" not in sel.ids
    assert len(sel.rows) == meta["n_with_gradient"]


@pytest.fixture(scope="module")
def projected(tiny_model_dir, tiny_adapters, pool_file, tmp_path_factory):
    """The same pool in small CountSketch stores: their scores are far from exact."""
    d = tmp_path_factory.mktemp("projected")
    return _stores(tiny_model_dir, tiny_adapters, pool_file, d, dim=16), d


@pytest.mark.parametrize("method", ["gist", "gist-full", "less", "mips"])
def test_rerank_of_every_row_equals_the_exact_formula(exact, projected, target_file, method):
    """--rerank with every row a candidate: a projected store gives exactly the raw-gradient selection."""
    _, ref, _ = exact
    stores, d = projected
    grad = "adam" if method == "less" else "sgd"
    sel = select(stores[grad], [target_file], None, method=method, top=10, rerank=1000, progress=False)
    ok, T0 = _train_matrix(ref[grad][0])
    _, T1 = _train_matrix(ref[grad][1])
    if method == "less":
        expected = less_reference([T0, T1], ref["val"], ref["subtasks"], [0.25, 0.75])
    else:
        k = sel.target.ranks[0]
        raw = select(exact[0]["sgd"], [target_file], None, method="gist", top=1, progress=False)
        assert sel.target.ranks == raw.target.ranks  # the automatic rank of the raw spectrum
        expected = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], k, full=method != "gist")
    top = [ok[i] for i in np.argsort(-expected, kind="stable")[:10]]
    assert list(sel.rows) == top and sel.report()["unit_val"] is True
    np.testing.assert_allclose(sel.scores, np.sort(expected)[::-1][:10], atol=2e-4)
    assert sel.report()["rerank"]["candidates"] == len(ok)
    # without re-ranking this store's selection is not the exact one (else the test shows nothing)
    plain = select(stores[grad], [target_file], None, method=method, top=10, progress=False)
    assert list(plain.rows) != top


def test_rerank_keeps_the_exact_best_of_the_projected_candidates(exact, projected, target_file):
    _, ref, _ = exact
    stores, d = projected
    scores_file = str(d / "projected.npy")
    select(stores["sgd"], [target_file], None, method="gist", top=6, scores_out=scores_file, progress=False)
    projected_scores = np.load(scores_file)
    sel = select(stores["sgd"], [target_file], None, method="gist", top=6, rerank=2.5, progress=False)
    candidates = np.lexsort((np.arange(len(projected_scores)), -projected_scores))[:15]
    ok, T0 = _train_matrix(ref["sgd"][0])
    _, T1 = _train_matrix(ref["sgd"][1])
    exact_scores = np.full(len(projected_scores), -np.inf)
    exact_scores[ok] = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], sel.target.ranks[0])
    best = candidates[np.argsort(-exact_scores[candidates], kind="stable")[:6]]
    assert sorted(sel.rows.tolist()) == sorted(best.tolist())
    np.testing.assert_allclose(sel.scores, np.sort(exact_scores[best])[::-1], atol=2e-4)
    assert sel.report()["rerank"]["candidates"] == 15


def test_round_robin_with_rerank_of_every_row_equals_the_exact_round_robin(exact, projected, target_file):
    _, ref, _ = exact
    stores, d = projected
    sel = select(
        stores["sgd"], [target_file], None, method="gist", subtasks="round-robin", top=10, rerank=1000, progress=False
    )
    ok, T0 = _train_matrix(ref["sgd"][0])
    _, T1 = _train_matrix(ref["sgd"][1])
    per = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], sel.target.ranks[0], per_subtask=True)
    expected = [ok[i] for i in round_robin_reference(per, 10)]
    assert list(sel.rows) == expected
    plain = select(stores["sgd"], [target_file], None, method="gist", subtasks="round-robin", top=10, progress=False)
    assert list(plain.rows) != expected  # the projected store alone gets it wrong (else the test shows nothing)


def test_round_robin_with_rerank_takes_the_candidates_in_turns(exact, projected, target_file):
    """--rerank 2.5 with round-robin: the 15 candidates are the projected round-robin's first 15; the sub-tasks
    then take turns again over the candidates, ranked by their exact scores."""
    _, ref, _ = exact
    stores, d = projected
    kw = dict(method="gist", subtasks="round-robin", progress=False)
    candidates = select(stores["sgd"], [target_file], None, top=15, **kw).rows
    sel = select(stores["sgd"], [target_file], None, top=6, rerank=2.5, **kw)
    ok, T0 = _train_matrix(ref["sgd"][0])
    _, T1 = _train_matrix(ref["sgd"][1])
    per = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], sel.target.ranks[0], per_subtask=True)
    sub = per[[ok.index(int(r)) for r in candidates]]
    order = np.argsort(candidates, kind="stable")  # ties go to the lower row, as in the reference
    expected = [int(candidates[order][i]) for i in round_robin_reference(sub[order], 6)]
    assert list(sel.rows) == expected
    assert sel.report()["rerank"]["candidates"] == 15


@pytest.mark.parametrize("method", ["gist", "gist-full", "mips"])
def test_subtask_picks_are_each_rows_best_subtask(exact, target_file, method):
    """Under the max rule each selected row is counted for the sub-task of its highest score (numpy reference);
    the scan carries it through the running top-N, the index through its per-query lists."""
    stores, ref, d = exact
    out = str(d / f"picks-{method}.jsonl")
    sel = select(stores["sgd"], [target_file], out, method=method, top=12, progress=False)
    ok, T0 = _train_matrix(ref["sgd"][0])
    _, T1 = _train_matrix(ref["sgd"][1])
    k = sel.target.ranks[0]
    per = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], k, full=method != "gist", per_subtask=True)
    best = per[[ok.index(int(r)) for r in sel.rows]].argmax(1)
    assert sel.subtask_of.tolist() == best.tolist()
    counts = np.bincount(best, minlength=3)
    assert len(set(counts.tolist())) > 1  # uneven here (else the counts could come from anywhere)
    meta = json.load(open(out + ".meta.json"))
    assert meta["subtask_rule"] == "max"
    assert meta["subtask_picks"] == dict(zip(sel.target.subtasks, counts.tolist()))


def test_subtask_picks_under_round_robin_and_rerank(exact, projected, target_file):
    """Round-robin counts each row for the sub-task whose turn took it; --rerank counts on the exact scores."""
    stores, ref, d = exact
    ok, T0 = _train_matrix(ref["sgd"][0])
    _, T1 = _train_matrix(ref["sgd"][1])
    rr = select(stores["sgd"], [target_file], None, method="gist", subtasks="round-robin", top=10, progress=False)
    assert rr.subtask_of.tolist() == [j % 3 for j in range(10)]
    assert rr.report()["subtask_picks"] == dict(zip(rr.target.subtasks, [4, 3, 3]))
    sel = select(projected[0]["sgd"], [target_file], None, method="gist", top=10, rerank=1000, progress=False)
    per = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], sel.target.ranks[0], per_subtask=True)
    assert sel.subtask_of.tolist() == per[[ok.index(int(r)) for r in sel.rows]].argmax(1).tolist()


def test_int8_store_selects_as_the_float32_store(tiny_model_dir, tiny_adapters, pool_file, target_file, tmp_path):
    """The same projection stored as int8 (a quarter of float32's bytes): every score within rounding of the
    float32 store's, and its FAISS index (built from the rescaled rows) answers as its own exact scan."""
    from gist_index.select import open_for_query, scan_top
    from gist_index.subspace import Scorer

    paths = {}
    for dt in ("float32", "int8"):
        cfg = BuildConfig(dim=256, max_length=MAXLEN, batch_size=7, chunk_rows=16, dtype=dt)
        paths[dt] = str(tmp_path / f"{dt}.gist")
        build(tiny_model_dir, tiny_adapters, [pool_file], paths[dt], cfg, progress=False)
    assert open_for_query(paths["int8"]).group["ckpt_0/vectors"].dtype == np.int8
    for method in ("gist", "gist-full"):
        got = {}
        for dt, p in paths.items():
            select(p, [target_file], None, method=method, top=5, scores_out=str(tmp_path / f"{dt}.npy"), progress=False)
            got[dt] = np.load(tmp_path / f"{dt}.npy")
        ok = np.isfinite(got["float32"])
        assert (np.isfinite(got["int8"]) == ok).all()
        np.testing.assert_allclose(got["int8"][ok], got["float32"][ok], atol=0.01)  # 0.0013 when written
        assert np.abs(got["int8"][ok] - got["float32"][ok]).max() > 0  # really rounded (else nothing is tested)
    mips = select(paths["int8"], [target_file], None, method="mips", top=8, progress=False)
    rows, scores = scan_top(open_for_query(paths["int8"]), Scorer(mips.target, "mips"), 8, progress=False)
    assert list(mips.rows) == list(rows)
    np.testing.assert_allclose(mips.scores, scores, atol=1e-5)


def test_a_subtask_taking_most_of_the_selection_is_warned_about(exact, target_file, caplog):
    """Under the max rule, a sub-task that is the best match of more than half of the selection and more than twice
    its equal share (here 2/3, with 3 sub-tasks) is named in a warning (counts from the numpy reference), once the
    selection has two examples per sub-task; round-robin never warns."""
    stores, ref, _ = exact
    ok, T0 = _train_matrix(ref["sgd"][0])
    _, T1 = _train_matrix(ref["sgd"][1])
    seen = set()
    for top in (1, 2, 3, 4, 6, 9, 12, 20, 30):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gist_index.select"):
            sel = select(stores["sgd"], [target_file], None, method="gist", top=top, progress=False)
        per = gist_reference([T0, T1], ref["val"], ref["subtasks"], [1, 3], sel.target.ranks[0], per_subtask=True)
        counts = np.bincount(per[[ok.index(int(r)) for r in sel.rows]].argmax(1), minlength=3)
        expected = len(sel.rows) >= 6 and counts.max() / len(sel.rows) > 2 / 3
        warned = [r.getMessage() for r in caplog.records if "best match of" in r.getMessage()]
        assert bool(warned) == expected, (top, counts, warned)
        if expected:
            assert warned[0].startswith(f"sub-task {sel.target.subtasks[int(counts.argmax())]} is the best match of")
        seen.add((len(sel.rows) >= 6, expected))
    # past the size floor both a dominant and no dominant sub-task occurred: the check above could fail either way
    assert {(True, True), (True, False)} <= seen
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gist_index.select"):
        select(stores["sgd"], [target_file], None, method="gist", subtasks="round-robin", top=2, progress=False)
    assert not [r for r in caplog.records if "best match of" in r.getMessage()]
