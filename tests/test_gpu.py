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
