"""quality.py's selection baselines (RDS, BM25; the gradient methods go through ``gist_index.select``), and the
fine-tuning and evaluation every selection gets."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np
import torch

from benchmarks.qualitylib.settings import RunSpec, example_text
from benchmarks.qualitylib.targets import TargetData, answer_text
from gist_index.data import Example, encode
from gist_index.model import load_base_model
from gist_index.progress import bar as progress_bar
from gist_index.train import evaluate_loss, train_lora


def per_subtask_max(sim: np.ndarray, subtasks: Sequence[str | None]) -> np.ndarray:
    """[n_pool, n_val] similarities -> max over sub-tasks of the mean within each sub-task."""
    names = sorted({s or "all" for s in subtasks})
    cols = [[j for j, s in enumerate(subtasks) if (s or "all") == n] for n in names]
    return np.stack([sim[:, c].mean(1) for c in cols], axis=1).max(1)


@torch.no_grad()
def mean_hidden_states(pm, tok, examples: Sequence[Example], max_length: int, progress: bool = False) -> np.ndarray:
    """Mean-pooled last-layer hidden states (prompt and response tokens), unit-normalised: RDS's representation."""
    from gist_index.extract import collate, length_buckets

    enc = [encode(e, tok, max_length) for e in examples]
    lm = pm.get_base_model() if hasattr(pm, "get_base_model") else pm
    decoder = lm.get_decoder()
    out = np.zeros((len(enc), lm.config.hidden_size), np.float32)
    pm.eval()
    batches = length_buckets([e.n_tokens for e in enc], 32)
    for b in progress_bar(batches, enabled=progress, desc="rds", unit="batch"):
        batch = collate([enc[i] for i in b], tok.pad_token_id, "cpu")
        h = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        m = batch.attention_mask[..., None].float()
        out[b] = ((h * m).sum(1) / m.sum(1)).numpy()
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def bm25_scores(retriever, val: Sequence[Example]) -> np.ndarray:
    """BM25 of the pool for each sub-task's query (its validation texts joined), each scaled by its maximum; max."""
    import bm25s

    groups: dict[str, list[str]] = {}
    for e in val:
        groups.setdefault(e.subtask or "all", []).append(example_text(e))
    per = []
    for texts in groups.values():
        q = bm25s.tokenize([" ".join(texts)], stopwords="en", return_ids=False, show_progress=False)[0]
        s = np.asarray(retriever.get_scores(q), np.float64)
        per.append(s / s.max() if s.max() > 0 else s)
    return np.max(np.stack(per, axis=1), axis=1)


def top_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` best rows, best first (ties: lower row first)."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")[:n]


# ---------------------------------------------------------------------------------------------------------
# 4. Fine-tuning and evaluation
# ---------------------------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    """Exact-match normalisation: lower case, no surrounding quotes/brackets/punctuation, single spaces."""
    text = text.lower().strip()
    text = re.sub(r"[\"'`()\[\]{}]", "", text)
    text = text.strip(string.whitespace + ".,;:!?")
    return re.sub(r"\s+", " ", text)


@torch.no_grad()
def greedy_answers(pm, tok, examples: Sequence[Example], max_length: int, max_new: int) -> list[str]:
    """Greedy decoding of at most ``max_new`` tokens after each example's prompt (left-padded batches)."""
    prompts = []
    for e in examples:
        enc = encode(e, tok, max_length)
        first = int(np.argmax(enc.label_mask))
        prompts.append(enc.input_ids[:first])
    out = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pm.eval()
    for s in range(0, len(order), 32):
        idx = order[s : s + 32]
        T = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), T), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, T - len(prompts[i]) :] = torch.as_tensor(prompts[i])
            att[r, T - len(prompts[i]) :] = 1
        gen = pm.generate(
            input_ids=ids,
            attention_mask=att,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        for r, i in enumerate(idx):
            new = gen[r, T:].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            out[i] = tok.decode(new, skip_special_tokens=True)
    return out


def evaluate(pm, tok, target: TargetData, spec: RunSpec) -> dict:
    """Mean test loss over the response tokens of the test subsample; exact match on its short answers."""
    res = {"loss": float(evaluate_loss(pm, tok, target.test, spec.max_length, batch_size=32).mean())}
    if target.em_rows:
        ex = [target.test[i] for i in target.em_rows]
        got = greedy_answers(pm, tok, ex, spec.max_length, spec.em_max_tokens + 1)
        res["em"] = float(np.mean([normalise(g) == normalise(answer_text(e, tok.eos_token)) for g, e in zip(got, ex)]))
    return res


def finetune(base_dir: str, tok, examples: Sequence[Example], spec: RunSpec, seed: int):
    """A fresh LoRA on a fresh copy of the base, trained on ``examples`` with the fine-tuning settings."""
    base = load_base_model(base_dir)
    pm, _ = train_lora(base, tok, examples, spec.lora, spec.train(spec.ft_epochs, spec.ft_lr, seed), None, False)
    return pm
