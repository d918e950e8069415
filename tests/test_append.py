"""``build --append`` adds pool files to a store: the result equals a build of all files at once, the index is
updated, and a duplicate id is refused without touching the store."""

import numpy as np
import pytest
import torch

from gist_index import BuildConfig, build, verify
from gist_index.errors import DataError, StoreError
from gist_index.index import load_index
from gist_index.store import GradientStore

from conftest import make_records, write_jsonl

# countsketch: a data-independent projection, so appending equals building everything at once byte for byte; a
# pca store keeps the basis fitted to its first data (test_append_to_a_pca_store_keeps_its_basis)
CFG = BuildConfig(dim=32, max_length=96, batch_size=4, chunk_rows=8, projection="countsketch")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("append")
    a = write_jsonl(d / "a.jsonl", make_records(20, seed=41))
    b = write_jsonl(d / "b.jsonl.gz", make_records(15, seed=42), gz=True)
    dup = make_records(5, seed=43)
    dup[3]["id"] = "ex-41-6"  # also in a.jsonl, line 7
    return a, b, write_jsonl(d / "dup.jsonl", dup)


def test_append_to_a_pca_store_keeps_its_basis(tmp_path, tiny_model_dir, tiny_adapters, files):
    """Appended rows are projected with the basis fitted at the first build (it is not refitted): they equal
    that projection of the appended examples' unprojected gradients."""
    from gist_index.build import projector_of
    from gist_index.data import encode, read_examples
    from gist_index.extract import CheckpointedModel
    from gist_index.project import IdentityProjector

    a, b, _ = files
    cfg = BuildConfig(dim=32, max_length=96, batch_size=4, chunk_rows=8, projection="pca", pca_sample=20)
    grown = str(tmp_path / "grown.gist")
    build(tiny_model_dir, tiny_adapters, [a], grown, cfg, progress=False)
    before = GradientStore.open(grown).pca_basis()
    build(tiny_model_dir, tiny_adapters, [b], grown, cfg, append=True, progress=False)
    g = GradientStore.open(grown)
    np.testing.assert_array_equal(g.pca_basis(), before)
    assert verify(grown) == []
    cm = CheckpointedModel(tiny_model_dir, tiny_adapters, device="cpu")
    enc = [encode(e, cm.tokenizer, 96) for e in read_examples(b)]
    p = projector_of(g)
    for c in range(2):
        raw = cm.gradients(enc, c, IdentityProjector(cm.source_dim))["vectors"]
        want = p.project(torch.from_numpy(raw)).numpy()
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(g.vectors(c, 20, 35), want, atol=2e-2)  # int8 rows


def test_append_equals_building_everything_at_once(tmp_path, tiny_model_dir, tiny_adapters, files):
    a, b, _ = files
    grown, whole = str(tmp_path / "grown.gist"), str(tmp_path / "whole.gist")
    build(tiny_model_dir, tiny_adapters, [a], grown, CFG, progress=False)
    assert GradientStore.open(grown).n_rows == 20
    build(tiny_model_dir, tiny_adapters, [b], grown, CFG, append=True, progress=False)
    build(tiny_model_dir, tiny_adapters, [a, b], whole, CFG, progress=False)
    g, w = GradientStore.open(grown), GradientStore.open(whole)
    assert g.n_rows == w.n_rows == 35
    assert list(g.column("ids")) == list(w.column("ids"))
    for i in range(w.n_chunks):
        assert g.chunk_entry(i)["files"] == w.chunk_entry(i)["files"]
    assert verify(grown) == []
    gi, wi = load_index(g), load_index(w)
    assert gi.ntotal == wi.ntotal == g.meta["summary"]["n_with_gradient"]
    q = np.random.default_rng(0).standard_normal((3, 2 * 32)).astype(np.float32)
    np.testing.assert_array_equal(gi.search(q, 10)[1], wi.search(q, 10)[1])
    # appending the same file again changes nothing
    build(tiny_model_dir, tiny_adapters, [b], grown, CFG, append=True, progress=False)
    assert GradientStore.open(grown).n_rows == 35


def test_duplicate_id_is_refused_and_the_store_is_untouched(tmp_path, tiny_model_dir, tiny_adapters, files):
    a, _, dup = files
    path = str(tmp_path / "s.gist")
    build(tiny_model_dir, tiny_adapters, [a], path, CFG, progress=False)
    before = GradientStore.open(path).meta
    with pytest.raises(DataError) as exc:
        build(tiny_model_dir, tiny_adapters, [dup], path, CFG, append=True, progress=False)
    assert str(exc.value).startswith(f"{dup}:4: field 'id': duplicate id 'ex-41-6' (first at {a}:7)")
    after = GradientStore.open(path)
    assert after.meta == before and verify(path) == []
    with pytest.raises(DataError, match="duplicate id"):
        build(
            tiny_model_dir,
            tiny_adapters,
            [a, a.replace("a.jsonl", "a.jsonl")],
            str(tmp_path / "t.gist"),
            CFG,
            progress=False,
        )


def test_append_needs_a_store_with_the_same_configuration(tmp_path, tiny_model_dir, tiny_adapters, files):
    a, b, _ = files
    with pytest.raises(StoreError, match="--append needs an existing store"):
        build(tiny_model_dir, tiny_adapters, [b], str(tmp_path / "none.gist"), CFG, append=True, progress=False)
    path = str(tmp_path / "s.gist")
    build(tiny_model_dir, tiny_adapters, [a], path, CFG, progress=False)
    with pytest.raises(StoreError, match="compute.max_length: store has 96, now 64"):
        build(
            tiny_model_dir,
            tiny_adapters,
            [b],
            path,
            BuildConfig(dim=32, max_length=64, batch_size=4, chunk_rows=8),
            append=True,
            progress=False,
        )
