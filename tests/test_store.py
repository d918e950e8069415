"""A store reopens with its metadata, and refuses a mismatched model, adapters or projection."""

import json
import os
import shutil

import numpy as np
import pytest

from gist_index import BuildConfig, build, info, select
from gist_index.errors import (
    ConfigMismatchError,
    IncompleteStoreError,
    StoreError,
    StoreNotFoundError,
)
from gist_index.select import open_for_query
from gist_index.store import GradientStore

CFG = BuildConfig(dim=64, max_length=128, batch_size=8, chunk_rows=16, seed=5)


@pytest.fixture(scope="module")
def store(tiny_model_dir, tiny_adapters, pool_file, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("store") / "pool.gist")
    build(tiny_model_dir, tiny_adapters, [pool_file], path, CFG, progress=False)
    return path


def test_reopen_reads_metadata_and_vectors(store, tiny_model_dir, pool_file):
    s = GradientStore.open(store)
    assert s.meta["format_version"] == 1 and s.meta["state"] == "complete"
    assert s.n_rows == 40 and s.dim == 64 and s.n_checkpoints == 2
    cfg = s.meta["config"]
    D = cfg["source_dim"]  # the default projection: pca, rank dim/4, its first stage the raw gradient (D < 65536)
    assert cfg["projection"] == {"kind": "pca", "dim": 64, "seed": 5, "source_dim": D, "inner_dim": D, "rank": 16}
    # fitted to a quarter of the 40 rows (10) at 2 checkpoints: 20 gradients, enough for rank 16
    assert s.meta["pca"]["sample"] == 10 and s.pca_basis().shape == (D, 16) and s.meta["pca"]["rank"] == 16
    assert cfg["compute"]["max_length"] == 128 and cfg["lora"]["r"] == 4
    assert cfg["model"]["hash"] and len(cfg["adapters"]) == 2
    assert s.meta["data"][0]["sha256"] and s.meta["data"][0]["rows"] == [0, 40]
    v = s.vectors(0, 0, 40)
    ok = s.column("status") == 0
    np.testing.assert_allclose(np.linalg.norm(v[ok], axis=1), 1, atol=1e-5)  # unit vectors back from int8
    assert s.group["ckpt_0/vectors"].dtype == np.int8  # the default for a projected store
    raw = s.vectors(0, 0, 40, dtype=None)
    assert (np.abs(raw[ok]).max(axis=1) == 127).all()
    ids = s.column("ids")
    assert ids[0] == "ex-1-0" and ids[1] == "pool.jsonl:2"  # the id field, else file:line
    meta = info(store)
    assert meta["bytes_per_example"] > 64 * 2 and meta["n_examples"] == 40


def test_same_build_again_resumes_without_work(store, tiny_model_dir, tiny_adapters, pool_file):
    before = {
        f: os.path.getmtime(os.path.join(store, "manifest", f)) for f in os.listdir(os.path.join(store, "manifest"))
    }
    build(tiny_model_dir, tiny_adapters, [pool_file], store, CFG, progress=False)
    after = {f: os.path.getmtime(os.path.join(store, "manifest", f)) for f in before}
    assert before == after


def test_rebuild_with_other_projection_is_refused_with_the_difference(store, tiny_model_dir, tiny_adapters, pool_file):
    other = BuildConfig(dim=32, max_length=128, batch_size=8, chunk_rows=16, seed=5)
    with pytest.raises(ConfigMismatchError) as exc:
        build(tiny_model_dir, tiny_adapters, [pool_file], store, other, progress=False)
    msg = str(exc.value)
    assert "compute.dim: store has 64, now 32" in msg and "projection.dim" in msg and "--overwrite" in msg


def test_query_refuses_mismatched_model_adapters_or_projection(store, tiny_model_dir, tiny_adapters, tmp_path):
    open_for_query(store, model=tiny_model_dir, adapters=tiny_adapters, projection={"dim": 64, "seed": 5})
    with pytest.raises(ConfigMismatchError, match="projection.dim: store has 64, now 128"):
        open_for_query(store, projection={"dim": 128})
    with pytest.raises(ConfigMismatchError, match="adapters"):
        open_for_query(store, adapters=list(reversed(tiny_adapters)))
    changed = tmp_path / "model"
    shutil.copytree(tiny_model_dir, changed)
    cfg = json.loads((changed / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (changed / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigMismatchError, match="model"):
        open_for_query(store, model=str(changed))


def test_select_refuses_a_model_that_changed_since_the_build(
    store, tiny_model_dir, tiny_adapters, target_file, tmp_path
):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    with open(copy / "tokenizer_config.json", "a") as fh:
        fh.write("\n")
    with pytest.raises(ConfigMismatchError, match="changed since the build"):
        select(store, [target_file], None, top=3, model=str(copy), progress=False)


def test_unfinished_store_is_refused_and_not_a_store_is_reported(store, tmp_path):
    bad = tmp_path / "copy.gist"
    shutil.copytree(store, bad)
    s = GradientStore.open(str(bad), mode="r+")
    s.mark_building()
    with pytest.raises(IncompleteStoreError, match="has not finished"):
        GradientStore.open(str(bad))
    with pytest.raises(StoreNotFoundError):
        GradientStore.open(str(tmp_path / "nothing"))
    assert isinstance(StoreNotFoundError("x"), FileNotFoundError)


def test_format_version_is_checked_first(store, tmp_path):
    bad = tmp_path / "v99.gist"
    shutil.copytree(store, bad)
    zj = json.loads((bad / "zarr.json").read_text())
    zj["attributes"]["gist_index"]["format_version"] = 99
    (bad / "zarr.json").write_text(json.dumps(zj))
    with pytest.raises(StoreError, match="format version 99"):
        GradientStore.open(str(bad))


def test_overwrite_refuses_a_directory_that_is_not_a_store(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("do not delete")
    with pytest.raises(StoreError, match="not a gist_index store"):
        GradientStore.remove(str(tmp_path / "precious"))
    assert (tmp_path / "precious" / "thesis.txt").exists()
