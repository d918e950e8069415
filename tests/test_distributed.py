"""A 2-rank torchrun build (gloo, CPU) equals the 1-rank build, and a 2-rank select equals a 1-rank select."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from gist_index.store import GradientStore

from conftest import make_records, write_jsonl


def gist(*args, nproc=1, env_extra=None):
    """Run the CLI in one process or under torchrun with ``nproc`` ranks; return the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if nproc == 1:
        cmd = [sys.executable, "-m", "gist_index", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(free_port()),
            "-m",
            "gist_index",
            *args,
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest(path):
    """chunk -> {file: sha256} of a store."""
    s = GradientStore.open(path)
    return {i: s.chunk_entry(i)["files"] for i in range(s.n_chunks)}


@pytest.fixture(scope="module")
def uneven_pool(tmp_path_factory):
    """A pool whose example lengths vary a lot, so a token-balanced split differs from a naive one."""
    recs = make_records(70, seed=21)
    for i in range(0, 70, 9):
        recs[i]["messages"] = [{"role": "user", "content": "long " * 40}, {"role": "assistant", "content": "ok " * 10}]
    return write_jsonl(tmp_path_factory.mktemp("dist") / "pool.jsonl", recs)


@pytest.mark.slow
def test_two_rank_build_and_select_equal_one_rank(tmp_path, tiny_model_dir, tiny_adapters, uneven_pool, target_file):
    common = [
        "--model",
        tiny_model_dir,
        "--adapter",
        *tiny_adapters,
        "--data",
        uneven_pool,
        "--dim",
        "64",
        "--max-length",
        "96",
        "--chunk-rows",
        "8",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    one, two = str(tmp_path / "one.gist"), str(tmp_path / "two.gist")
    gist("build", *common, "--out", one)
    p = gist("build", *common, "--out", two, nproc=2)
    assert "on 2 process(es)" in p.stderr
    a, b = GradientStore.open(one), GradientStore.open(two)
    assert list(a.column("ids")) == list(b.column("ids"))
    for c in range(2):
        np.testing.assert_array_equal(a.vectors(c, 0, a.n_rows), b.vectors(c, 0, b.n_rows))
        np.testing.assert_array_equal(a.column(f"ckpt_{c}/norms"), b.column(f"ckpt_{c}/norms"))
    assert manifest(one) == manifest(two)  # byte-identical chunk files

    sel = ["--target", target_file, "--fraction", "0.2", "--no-progress"]
    gist("select", "--index", one, *sel, "--out", str(tmp_path / "one.jsonl"))
    gist("select", "--index", two, *sel, "--out", str(tmp_path / "two.jsonl"), nproc=2)
    r1 = [json.loads(line) for line in open(tmp_path / "one.jsonl")]
    r2 = [json.loads(line) for line in open(tmp_path / "two.jsonl")]
    assert len(r1) == round(0.2 * a.meta["summary"]["n_with_gradient"]) and [r["id"] for r in r1] == [
        r["id"] for r in r2
    ]
    np.testing.assert_allclose([r["score"] for r in r1], [r["score"] for r in r2], rtol=1e-6)
    picks = [json.load(open(tmp_path / f"{n}.jsonl.meta.json"))["subtask_picks"] for n in ("one", "two")]
    assert picks[0] == picks[1] and sum(picks[0].values()) == len(r1)  # each row's sub-task survives the merge

    rr = [*sel, "--subtasks", "round-robin"]  # per-sub-task lists gathered from both ranks, then merged
    gist("select", "--index", one, *rr, "--out", str(tmp_path / "one-rr.jsonl"))
    gist("select", "--index", two, *rr, "--out", str(tmp_path / "two-rr.jsonl"), nproc=2)
    r1 = [json.loads(line)["id"] for line in open(tmp_path / "one-rr.jsonl")]
    assert r1 == [json.loads(line)["id"] for line in open(tmp_path / "two-rr.jsonl")] and len(r1) == len(r2)


@pytest.mark.slow
def test_two_rank_pca_build_equals_one_rank(tmp_path, tiny_model_dir, tiny_adapters, uneven_pool):
    """Rank 0 fits the pca basis between the pre-pass and the chunks; every rank then projects with it."""
    common = ["--model", tiny_model_dir, "--adapter", *tiny_adapters, "--data", uneven_pool, "--dim", "64"]
    common += ["--projection", "pca", "--pca-rank", "24", "--pca-sample", "30", "--max-length", "96"]
    common += ["--chunk-rows", "8", "--batch-size", "4", "--no-progress"]
    one, two = str(tmp_path / "one.gist"), str(tmp_path / "two.gist")
    gist("build", *common, "--out", one)
    gist("build", *common, "--out", two, nproc=2)
    a, b = GradientStore.open(one), GradientStore.open(two)
    assert a.meta["pca"] == {**b.meta["pca"], "seconds": a.meta["pca"]["seconds"]} and a.meta["pca"]["rank"] == 24
    np.testing.assert_array_equal(a.pca_basis(), b.pca_basis())
    for c in range(2):
        np.testing.assert_array_equal(a.vectors(c, 0, a.n_rows), b.vectors(c, 0, b.n_rows))


def test_chunks_are_shared_out_by_characters():
    from gist_index.build import assign_chunks

    plan = assign_chunks({0: 100, 1: 10, 2: 10, 3: 10, 4: 90, 5: 5}, 2)
    assert sorted(plan[0] + plan[1]) == list(range(6))
    loads = [sum({0: 100, 1: 10, 2: 10, 3: 10, 4: 90, 5: 5}[i] for i in p) for p in plan]
    assert abs(loads[0] - loads[1]) <= 10
