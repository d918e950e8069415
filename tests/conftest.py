"""Shared fixtures: a tiny random Llama built from a config, a tokenizer trained on the spot, LoRA checkpoints
from a short real training run, and small pools and targets. Nothing is downloaded."""

from __future__ import annotations

import gzip
import json
import os
import random

import pytest
import torch

from gist_index.config import LoraConfig, TrainConfig
from gist_index.data import parse_example
from gist_index.model import make_llama, save_model, train_tokenizer
from gist_index.train import train_lora

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
WORDS = (
    "the a cat dog runs jumps over under river mountain blue red green happy sad movie review great terrible "
    "add subtract number seven three twelve answer question because therefore true false yes no city book"
).split()
torch.set_num_threads(1)  # tiny models: one thread is fastest and deterministic


def sentence(rng: random.Random, n: int) -> str:
    """A random sentence of ``n`` words."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_records(n: int, seed: int = 0, subtasks: tuple[str, ...] = (), prompt_completion_every: int = 5) -> list[dict]:
    """``n`` synthetic records: mostly ``messages``, some ``prompt``/``completion``; ids given to most."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if prompt_completion_every and i % prompt_completion_every == 3:
            rec = {"prompt": sentence(rng, rng.randint(3, 12)), "completion": sentence(rng, rng.randint(1, 6))}
        else:
            msgs = [
                {"role": "user", "content": sentence(rng, rng.randint(3, 14))},
                {"role": "assistant", "content": sentence(rng, rng.randint(1, 8))},
            ]
            if i % 7 == 0:
                msgs = [{"role": "system", "content": "be brief"}] + msgs
            rec = {"messages": msgs}
        if i % 4 != 1:
            rec["id"] = f"ex-{seed}-{i}"
        if subtasks:
            rec["subtask"] = subtasks[i % len(subtasks)]
        out.append(rec)
    return out


def write_jsonl(path, records, gz: bool = False) -> str:
    """Write records as JSON Lines (gzipped when ``gz``)."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny Llama (hidden 32, 2 layers) and its tokenizer."""
    texts = ["".join(t for t, _ in parse_example(r, "t", 1).segments) for r in make_records(300, seed=12345)]
    tok = train_tokenizer(texts, vocab_size=400)
    model = make_llama(tok, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=256, seed=0)
    return save_model(model, tok, str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> list[str]:
    """Two LoRA checkpoints (r=4, alpha=16, q/k/v/o) from a short real training run, with Adam state."""
    from gist_index.model import load_base_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    base = load_base_model(tiny_model_dir)
    examples = [parse_example(r, "warm.jsonl", i + 1) for i, r in enumerate(make_records(16, seed=99))]
    out = str(tmp_path_factory.mktemp("warmup"))
    _, ckpts = train_lora(
        base,
        tok,
        examples,
        LoraConfig(r=4, alpha=16, dropout=0.0),
        TrainConfig(epochs=2, lr=5e-3, batch_size=8, micro_batch_size=4, max_length=64),
        out,
        progress=False,
    )
    return ckpts


@pytest.fixture(scope="session")
def pool_file(tmp_path_factory) -> str:
    """A 40-example pool (one response truncated away at max_length 48)."""
    recs = make_records(40, seed=1)
    recs[5] = {
        "id": "too-long",
        "messages": [
            {"role": "user", "content": sentence(random.Random(5), 120)},
            {"role": "assistant", "content": "yes"},
        ],
    }
    return write_jsonl(tmp_path_factory.mktemp("pool") / "pool.jsonl", recs)


@pytest.fixture(scope="session")
def target_file(tmp_path_factory) -> str:
    """A target with 3 sub-tasks, 2 examples each (gzipped)."""
    recs = make_records(6, seed=7, subtasks=("arith", "sentiment", "logic"), prompt_completion_every=0)
    return write_jsonl(tmp_path_factory.mktemp("target") / "val.jsonl.gz", recs, gz=True)
