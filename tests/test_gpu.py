"""On a CUDA machine: gradients, projections and scans on the GPU equal those on the CPU (skipped elsewhere)."""

import numpy as np
import pytest
import torch

from gist_index.data import encode, parse_example
from gist_index.extract import CheckpointedModel
from gist_index.project import CountSketchProjector, hash_coordinates

from conftest import make_records

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_hashes_are_the_same_on_the_gpu():
    cpu = hash_coordinates(3, 2**33, 100_000, 8192)
    gpu = hash_coordinates(3, 2**33, 100_000, 8192, device="cuda")
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


def test_gpu_gradients_equal_cpu_gradients(tiny_model_dir, tiny_adapters):
    recs = make_records(12, seed=8)
    out = {}
    for dev in ("cpu", "cuda"):
        cm = CheckpointedModel(tiny_model_dir, tiny_adapters, device=dev)
        enc = [encode(parse_example(r, "g.jsonl", i + 1), cm.tokenizer, 96) for i, r in enumerate(recs)]
        proj = CountSketchProjector(cm.source_dim, 256, seed=1)
        out[dev] = cm.gradients(enc, 1, proj, batch_size=5)["vectors"]
    np.testing.assert_allclose(out["cuda"], out["cpu"], rtol=1e-3, atol=1e-6)


def test_gpu_scan_equals_cpu_scan():
    from gist_index.subspace import Scorer, build_target

    rng = np.random.default_rng(0)
    target = build_target([rng.standard_normal((6, 64))], ["a", "b"] * 3, [1.0])
    x = torch.from_numpy(rng.standard_normal((500, 64)).astype(np.float32))
    for method in ("gist", "less", "mips"):
        a = Scorer(target, method, "cpu").score([x])[0]
        b = Scorer(target, method, "cuda").score([x])[0].cpu()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gpu_pca_build_equals_cpu_build(tiny_model_dir, tiny_adapters, pool_file, tmp_path):
    """The pca basis is fitted on the build's device; on the GPU it spans the same subspace and the stored rows
    agree with the CPU build's."""
    from gist_index import BuildConfig, build
    from gist_index.store import GradientStore

    cfg = BuildConfig(dim=64, projection="pca", pca_rank=16, pca_sample=30, dtype="float32", max_length=96)
    stores = {}
    for dev in ("cpu", "cuda"):
        out = str(tmp_path / f"{dev}.gist")
        build(tiny_model_dir, tiny_adapters, [pool_file], out, cfg, device=dev, progress=False)
        stores[dev] = GradientStore.open(out)
    a, b = (stores[d].pca_basis().astype(np.float64) for d in ("cpu", "cuda"))
    np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-3)
    for c in range(2):
        x, y = (stores[d].vectors(c, 0, stores[d].n_rows) for d in ("cpu", "cuda"))
        # the same subspace, but each singular vector's sign may differ: compare the rows' Gram matrices
        np.testing.assert_allclose(x @ x.T, y @ y.T, atol=1e-3)
