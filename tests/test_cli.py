"""The command line end to end, as a user runs it: warmup, build, select, info, verify."""

import json
import os
import subprocess
import sys

import pytest


def run(*args, check=True):
    """Run ``python -m gist_index ARGS`` and return the completed process."""
    proc = subprocess.run([sys.executable, "-m", "gist_index", *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_warmup_build_select_info_verify(tmp_path, tiny_model_dir, pool_file, target_file):
    warm = tmp_path / "warm"
    p = run(
        "warmup",
        "--model",
        tiny_model_dir,
        "--data",
        pool_file,
        "--out",
        str(warm),
        "--fraction",
        "0.5",
        "--lora-r",
        "4",
        "--lora-alpha",
        "16",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--max-length",
        "128",
        "--lr",
        "1e-3",
        "--no-progress",
    )
    ckpts = [line.strip() for line in p.stdout.splitlines()[1:]]
    assert len(ckpts) == 2 and all(os.path.isfile(os.path.join(c, "optimizer.pt")) for c in ckpts)
    assert json.load(open(os.path.join(ckpts[0], "adapter_config.json")))["r"] == 4
    store = tmp_path / "pool.gist"
    p = run(
        "build",
        "--model",
        tiny_model_dir,
        "--adapter",
        *ckpts,
        "--data",
        pool_file,
        "--out",
        str(store),
        "--dim",
        "128",
        "--max-length",
        "128",
        "--chunk-rows",
        "16",
        "--no-progress",
    )
    assert "40 examples" in p.stdout and "truncated away" in p.stdout
    out = tmp_path / "sel.jsonl"
    p = run(
        "select",
        "--index",
        str(store),
        "--target",
        target_file,
        "--out",
        str(out),
        "--fraction",
        "0.1",
        "--no-progress",
    )
    assert "rank k per checkpoint" in p.stdout and "#1" in p.stdout
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 4 and [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["score"] >= rows[-1]["score"]
    meta = json.load(open(str(out) + ".meta.json"))
    assert meta["n_selected"] == 4 and len(meta["rank"]) == 2
    picks = meta["subtask_picks"]
    assert sum(picks.values()) == 4 and len(picks) == 3  # the target has three sub-tasks
    assert "picked per sub-task (best match): " + ", ".join(f"{k} {v}" for k, v in picks.items()) in p.stdout
    p = run("info", str(store), "--json")
    info = json.loads(p.stdout)
    assert info["n_examples"] == 40 and info["projection"]["dim"] == 128 and info["bytes_per_example"] > 0
    p = run("verify", str(store))
    assert "sound" in p.stdout
    top3 = ["select", "--index", str(store), "--target", target_file, "--out", str(out), "--top", "3"]
    run(*top3, "--method", "mips", "--no-progress")
    assert len(open(out).readlines()) == 3
    p = run(*top3, "--rerank", "2", "--no-progress")
    assert "re-ranked 6 candidates on exact gradients" in p.stdout
    meta = json.load(open(str(out) + ".meta.json"))
    assert meta["rerank"]["candidates"] == 6 and meta["n_selected"] == 3
    p = run(*top3, "--rerank", "0.5", check=False)
    assert p.returncode != 0 and "rerank must be 0 (off) or at least 1" in p.stderr
