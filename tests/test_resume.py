"""Builds killed with SIGKILL at random moments resume to the same store as an uninterrupted build, without
recomputing complete chunks; ``verify`` catches flipped bytes, missing chunks and unfinished builds."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gist_index import verify
from gist_index.cli import main
from gist_index.errors import CorruptStoreError, IncompleteStoreError
from gist_index.select import open_for_query, scan_top
from gist_index.store import GradientStore

from conftest import make_records, write_jsonl


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("resume") / "pool.jsonl", make_records(120, seed=31))


def build_cmd(model, adapters, pool, out):
    return [
        sys.executable,
        "-m",
        "gist_index",
        "build",
        "--model",
        model,
        "--adapter",
        *adapters,
        "--data",
        pool,
        "--out",
        out,
        "--dim",
        "32",
        "--max-length",
        "96",
        "--chunk-rows",
        "8",
        "--batch-size",
        "2",
        "--no-progress",
    ]


def run_build(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def entries(path):
    d = os.path.join(path, "manifest")
    if not os.path.isdir(d):
        return {}
    return {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in os.listdir(d) if f.startswith("chunk-")}


def files_of(path):
    s = GradientStore.open(path)
    return {i: s.chunk_entry(i)["files"] for i in range(s.n_chunks)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, tiny_adapters, big_pool):
    out = str(tmp_path_factory.mktemp("ref") / "ref.gist")
    run_build(build_cmd(tiny_model_dir, tiny_adapters, big_pool, out))
    return out


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_equals_uninterrupted(
    tmp_path, tiny_model_dir, tiny_adapters, big_pool, reference
):
    rng = random.Random(1234)
    ref = files_of(reference)
    n_chunks = len(ref)
    stamps = sorted(entries(reference).values())
    chunk_s = (stamps[-1] - stamps[0]) / 1e9 / max(1, len(stamps) - 1)  # how long a chunk takes on this machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    interrupted = 0
    for trial in range(5):
        out = str(tmp_path / f"t{trial}.gist")
        cmd = build_cmd(tiny_model_dir, tiny_adapters, big_pool, out)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 120
        if trial == 0:  # anywhere in start-up, creation or the pre-pass (before the first chunk is complete)
            until = time.time() + rng.uniform(0.3, 3.0)
            while time.time() < until and not entries(out) and proc.poll() is None:
                time.sleep(0.005)
        else:  # after some chunks, at a random moment inside the next one
            target = rng.randrange(1, n_chunks - 1)
            while len(entries(out)) < target and proc.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.9 * chunk_s))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = proc.returncode == -signal.SIGKILL  # else it had finished first: the rerun must change nothing
        interrupted += killed
        before = entries(out)
        if killed and os.path.exists(out):
            with pytest.raises(IncompleteStoreError):
                open_for_query(out)
        p = run_build(cmd)
        done_now = len([f for f in before if f.startswith("chunk-")])
        if killed and os.path.exists(out) and before:
            assert f"{n_chunks - done_now} of {n_chunks} chunks to compute" in p.stderr
        after = entries(out)
        assert all(after[f] == t for f, t in before.items())  # complete chunks were not recomputed
        assert files_of(out) == ref  # byte-identical to the uninterrupted build
        assert verify(out) == []
        a, b = GradientStore.open(out), GradientStore.open(reference)
        np.testing.assert_array_equal(a.vectors(1, 0, a.n_rows), b.vectors(1, 0, b.n_rows))
        assert list(a.column("ids")) == list(b.column("ids"))
    assert interrupted >= 4, f"only {interrupted} of 5 builds were still running when the kill came"


def test_verify_catches_flipped_byte_missing_chunk_and_unfinished_build(tmp_path, reference, capsys):
    assert verify(reference) == []
    assert main(["verify", reference]) == 0
    flipped = str(tmp_path / "flipped.gist")
    shutil.copytree(reference, flipped)
    victim = os.path.join(flipped, "ckpt_1", "vectors", "c", "3", "0")
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(victim, "wb").write(bytes(data))
    problems = verify(flipped)
    assert problems == [f"chunk 3: file ckpt_1/vectors/c/3/0 does not match its checksum ({len(data)} bytes)"]
    capsys.readouterr()
    assert main(["verify", flipped]) == 1
    assert "does not match its checksum" in capsys.readouterr().out
    s = open_for_query(flipped)
    with pytest.raises(CorruptStoreError, match="chunk 3 of ckpt_1/vectors does not match its CRC32C"):
        scan_top(s, _scorer(s), 5, progress=False)

    deleted = str(tmp_path / "deleted.gist")
    shutil.copytree(reference, deleted)
    os.unlink(os.path.join(deleted, "ckpt_0", "vectors", "c", "5", "0"))
    assert verify(deleted) == ["chunk 5: file ckpt_0/vectors/c/5/0 is missing"]
    with pytest.raises(CorruptStoreError, match="ckpt_0/vectors/c/5/0 is missing"):
        scan_top(open_for_query(deleted), _scorer(open_for_query(deleted)), 5, progress=False)

    truncated = str(tmp_path / "truncated.gist")
    shutil.copytree(reference, truncated)
    ids_chunk = os.path.join(truncated, "ids", "c", "2")
    open(ids_chunk, "r+b").truncate(5)
    assert any("chunk 2: file ids/c/2 does not match" in p for p in verify(truncated))

    unfinished = str(tmp_path / "unfinished.gist")
    shutil.copytree(reference, unfinished)
    os.unlink(os.path.join(unfinished, "manifest", "chunk-00000007.json"))
    GradientStore.open(unfinished, mode="r+").mark_building()
    problems = verify(unfinished)
    assert "unfinished build: state is 'building', not 'complete'" in problems
    assert "1 of 15 chunks are not complete: 7" in problems


def _scorer(store):
    from gist_index.subspace import Scorer, build_target

    rng = np.random.default_rng(0)
    val = [rng.standard_normal((4, store.dim)) for _ in range(store.n_checkpoints)]
    return Scorer(build_target(val, ["a", "a", "b", "b"], [1] * store.n_checkpoints), "gist")


def test_malformed_pool_line_fails_with_line_number_and_leaves_no_store(
    tmp_path, tiny_model_dir, tiny_adapters, big_pool, capsys
):
    bad = tmp_path / "bad.jsonl"
    lines = open(big_pool).read().splitlines()
    lines[56] = lines[56][:-7]
    bad.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "bad.gist")
    code = main(build_cmd(tiny_model_dir, tiny_adapters, str(bad), out)[3:] + ["-q"])
    assert code == 2
    assert f"{bad}:57: not valid JSON" in capsys.readouterr().err
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".bad.gist")]
