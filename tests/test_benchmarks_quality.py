"""benchmarks/qualitylib: the fidelity benchmark's pca simulation must fit the basis ``build`` fits, or its
overlap figures describe a different store from the one users get."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.qualitylib.fidelity import pca_projectors  # noqa: E402
from benchmarks.qualitylib.settings import RunSpec  # noqa: E402
from gist_index import build  # noqa: E402
from gist_index.build import pca_sample_rows  # noqa: E402
from gist_index.config import BuildConfig  # noqa: E402
from gist_index.data import read_examples  # noqa: E402
from gist_index.store import GradientStore  # noqa: E402

from conftest import make_records, write_jsonl  # noqa: E402

MAXLEN = 48


def smallest_principal_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The cosine of the largest principal angle between the column spans of two orthonormal bases."""
    return float(np.linalg.svd(a.T.astype(np.float64) @ b.astype(np.float64), compute_uv=False).min())


@pytest.fixture(scope="module")
def held_out_pca_store(tiny_model_dir, tiny_adapters, tmp_path_factory):
    """A pca store whose sample (72 rows) is large enough for build to hold every 8th sampled row out of the fit."""
    tmp = tmp_path_factory.mktemp("bench_pca")
    pool_file = write_jsonl(tmp / "pool.jsonl", make_records(90, seed=7))
    cfg = BuildConfig(dim=128, projection="pca", pca_sample=72, max_length=MAXLEN, batch_size=7, chunk_rows=32)
    out = str(tmp / "pool.gist")
    build(tiny_model_dir, tiny_adapters, [pool_file], out, cfg, progress=False)
    return out, cfg, list(read_examples(pool_file))


def test_pca_projectors_fit_the_basis_build_fits(tiny_model_dir, tiny_adapters, held_out_pca_store):
    out, cfg, pool = held_out_pca_store
    built = GradientStore.open(out).pca_basis()
    assert GradientStore.open(out).meta["pca"]["held_out"] > 0  # the case the simulation must mirror
    rows = pca_sample_rows(len(pool), cfg.pca_sample, cfg.seed)
    spec = RunSpec(max_length=MAXLEN, batch_size=5)  # another batch size: the basis must not depend on it
    mine = pca_projectors(tiny_model_dir, tiny_adapters, pool, rows, [128], spec)[128].basis_np
    assert mine.shape == built.shape == (built.shape[0], cfg.resolved_pca_rank)
    assert smallest_principal_cosine(mine, built) > 0.9999
    # fitted to every sampled row (no hold-out) the basis is measurably another one: the check above can fail
    other = pca_projectors(tiny_model_dir, tiny_adapters, pool, rows, [128], spec, hold_out=False)[128].basis_np
    assert smallest_principal_cosine(other, built) < 0.99  # 0.06 here


def _loss(seeds: list[float]) -> dict:
    return {"mean": float(np.mean(seeds)), "std": float(np.std(seeds)), "seeds": seeds}


def test_summary_pairs_variants_with_runs_seed_by_seed(tmp_path):
    """quality_summary joins a quality_variants.py run to its targets and compares two methods per seed; checked
    against the differences written out by hand, and a variant given twice is refused."""
    import json

    from benchmarks.quality_summary import add_variants, paired

    run = {"targets": {"t1": {"methods": {"less": {"loss": _loss([2.0, 3.0, 2.5])}}}, "t2": {"methods": {}}}}
    run["targets"]["t2"]["methods"]["less"] = {"loss": _loss([1.0, 1.0, 1.0])}
    rows = [(n, n, t, run) for n, t in run["targets"].items()]
    var = tmp_path / "v.json"
    var.write_text(
        json.dumps(
            {"targets": {"t1": {"x": {"loss": _loss([1.9, 3.2, 2.3])}}, "t2": {"x": {"loss": _loss([0.5, 0.9, 0.8])}}}}
        )
    )
    assert add_variants(rows, [str(var)]) == ["x"]
    lines, counts = paired(rows, "x", "less")
    assert "-0.100, +0.200, -0.200" in lines[2] and "-0.033" in lines[2]
    assert "-0.500, -0.100, -0.200" in lines[3]
    assert counts == {"targets": 2, "a_mean_not_higher": 2, "a_lower_every_seed": 1, "b_lower_every_seed": 0}
    with pytest.raises(SystemExit, match="given twice"):
        add_variants(rows, [str(var)])
