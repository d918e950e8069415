"""Per-example gradients from one batched pass equal a batch-size-1 autograd loop over HF's own loss."""

import numpy as np
import pytest
import torch

from gist_index.data import encode, parse_example
from gist_index.extract import (
    CheckpointedModel,
    GradientExtractor,
    collate,
    length_buckets,
    load_adam_state,
    lora_params,
    reference_gradients,
)
from gist_index.project import CountSketchProjector, IdentityProjector

from conftest import make_records


@pytest.fixture(scope="module")
def cm(tiny_model_dir, tiny_adapters):
    return CheckpointedModel(tiny_model_dir, tiny_adapters, device="cpu")


def _encoded(cm, n=9, seed=3, max_length=64):
    recs = make_records(n, seed=seed)
    enc = [encode(parse_example(r, "x.jsonl", i + 1), cm.tokenizer, max_length) for i, r in enumerate(recs)]
    assert all(e.n_label_tokens > 0 for e in enc)
    return enc


def _rel_err(a, b):
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


@pytest.mark.parametrize("ckpt", [0, 1])
def test_sgd_gradients_match_batch_size_one_loop(cm, ckpt):
    cm.use(ckpt)
    enc = _encoded(cm)
    assert len({e.n_tokens for e in enc}) > 3  # a padded batch of different lengths
    batch = collate(enc, cm.tokenizer.pad_token_id, "cpu")
    ours = GradientExtractor(cm.pm, IdentityProjector(cm.source_dim)).compute(batch)
    ref = reference_gradients(cm.pm, batch)
    assert ref.shape == (len(enc), cm.source_dim)
    assert _rel_err(ours["vectors"], ref) < 1e-4
    assert torch.allclose(ours["grad_norm"], ref.norm(dim=1), rtol=1e-4)


@pytest.mark.parametrize("momentum", [True, False], ids=["adam", "rms"])
def test_adam_gradients_match_less_formula(cm, momentum):
    cm.use(1)
    enc = _encoded(cm, seed=4)
    batch = collate(enc, cm.tokenizer.pad_token_id, "cpu")
    adam = cm.adam_state(1)
    assert any(m.abs().sum() > 0 for m, _ in adam)  # a real optimizer state
    ours = GradientExtractor(cm.pm, IdentityProjector(cm.source_dim), adam, momentum=momentum).compute(batch)
    # LESS's formula, written out here on the plain reference gradients (rms: without the momentum term)
    g = reference_gradients(cm.pm, batch)
    m, v = torch.cat([a[0] for a in adam]), torch.cat([a[1] for a in adam])
    ref = ((0.9 * m if momentum else 0) + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g * g + 1e-8)
    assert _rel_err(ours["vectors"], ref) < 1e-4
    assert _rel_err(reference_gradients(cm.pm, batch, adam, momentum), ref) < 1e-5
    if not momentum:  # without the shared term, rms is far from adam
        assert _rel_err(ours["vectors"], reference_gradients(cm.pm, batch, adam)) > 0.1


@pytest.mark.parametrize("ckpt", [0, 1])
def test_lora_gradients_match_scaled_gd_written_out(cm, ckpt):
    """``--gradient lora``: the batch-size-1 reference gradients, each LoRA factor's block preconditioned here in
    numpy from the checkpoint's weights: A's gradient (B^T B + delta I)^-1 on the left, B's (A A^T + delta I)^-1 on
    the right, delta = 1e-3 trace / r."""
    cm.use(ckpt)
    enc = _encoded(cm, seed=7)
    batch = collate(enc, cm.tokenizer.pad_token_id, "cpu")
    g = reference_gradients(cm.pm, batch).double().numpy()
    weights = {n: p.detach().double().numpy() for n, p in cm.pm.named_parameters() if "lora_" in n}
    ref, off, in_a = np.zeros_like(g), 0, []
    for name, w in weights.items():
        block = g[:, off : off + w.size].reshape(len(g), *w.shape)
        if ".lora_A." in name:
            b = weights[name.replace(".lora_A.", ".lora_B.")]
            gram = b.T @ b
            out = np.linalg.inv(gram + 1e-3 * np.trace(gram) / len(gram) * np.eye(len(gram))) @ block
        else:
            a = weights[name.replace(".lora_B.", ".lora_A.")]
            gram = a @ a.T
            out = block @ np.linalg.inv(gram + 1e-3 * np.trace(gram) / len(gram) * np.eye(len(gram)))
        ref[:, off : off + w.size] = out.reshape(len(g), -1)
        in_a += [".lora_A." in name] * w.size
        off += w.size
    ours = cm.gradients(enc, ckpt, IdentityProjector(cm.source_dim), "lora")["vectors"]
    rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 1e-4
    in_a = np.asarray(in_a)
    share = lambda x: ((x[:, in_a] ** 2).sum(1) / (x**2).sum(1)).mean()  # noqa: E731
    assert share(ref) > 2 * share(g)  # B is small after a short warmup: A's side gains most


def test_lora_metrics_refuse_a_factor_of_zeros_or_without_partner():
    from gist_index.errors import ModelLoadError
    from gist_index.extract import LoraParam, lora_metrics

    a = torch.nn.Linear(6, 2, bias=False)
    b = torch.nn.Linear(2, 5, bias=False)
    torch.nn.init.zeros_(b.weight)  # B as LoRA initialises it: no warmup yet
    params = [LoraParam("m.lora_A.weight", a, 12, 0), LoraParam("m.lora_B.weight", b, 10, 12)]
    with pytest.raises(ModelLoadError, match="m.lora_B.weight is all zeros"):
        lora_metrics(params)
    with torch.no_grad():
        b.weight.normal_()
    assert [m.shape for m in lora_metrics(params)] == [(2, 2), (2, 2)]
    with pytest.raises(ModelLoadError, match="has no partner m.lora_B.weight"):
        lora_metrics(params[:1])


def test_projected_gradients_are_the_projection_of_the_reference(cm):
    cm.use(0)
    enc = _encoded(cm, seed=5)
    batch = collate(enc, cm.tokenizer.pad_token_id, "cpu")
    proj = CountSketchProjector(cm.source_dim, 256, seed=3)
    ours = GradientExtractor(cm.pm, proj).compute(batch)["vectors"]
    ref = proj.project(reference_gradients(cm.pm, batch))
    assert _rel_err(ours, ref) < 1e-4


def test_gradients_do_not_depend_on_batching(cm):
    enc = _encoded(cm, n=12, seed=6)
    a = cm.gradients(enc, 0, IdentityProjector(cm.source_dim), batch_size=12)["vectors"]
    b = cm.gradients(enc, 0, IdentityProjector(cm.source_dim), batch_size=1)["vectors"]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_lora_params_follow_named_parameter_order(cm):
    names = [p.name for p in lora_params(cm.pm)]
    expected = [n.replace(".default", "") for n, _ in cm.pm.named_parameters() if "lora_" in n]
    assert names == expected
    assert sum(p.numel for p in lora_params(cm.pm)) == cm.source_dim


def test_adam_state_shapes_are_checked(cm, tmp_path, tiny_adapters):
    import shutil

    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_adapters[0], bad)
    sd = torch.load(bad / "optimizer.pt", weights_only=True)
    sd["state"][0]["exp_avg"] = torch.zeros(3)
    torch.save(sd, bad / "optimizer.pt")
    from gist_index.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="optimizer.pt: state 0 has 3 values"):
        load_adam_state(str(bad), lora_params(cm.pm), "cpu")


def test_length_buckets_cover_every_index_once():
    lengths = [5, 50, 7, 48, 6, 49, 100, 1]
    batches = length_buckets(lengths, batch_size=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    assert all(len(b) <= 3 for b in batches)
    # sorted by length: the spread inside a batch is small
    assert max(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) <= 51
    assert all(max(lengths[i] for i in b) * len(b) <= 100 for b in length_buckets(lengths, 8, max_tokens=100))
