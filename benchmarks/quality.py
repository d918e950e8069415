"""Selection quality: does fine-tuning on GIST's selection lower the target test loss more than the alternatives?

Usage (the defaults are the documented run; see benchmarks/README.md, "## quality.py")::

    nice -n 10 python benchmarks/quality.py                     # the three targets in ../shared/data/targets
    python benchmarks/quality.py --targets DIR [DIR ...]        # and more: each DIR holds val.jsonl(.gz), test...
    python benchmarks/quality.py --base-only                    # just pretrain (and cache) the base model

Base model (cached, pretrained once): byte-level BPE tokenizer and a small Llama trained from scratch on the pool's
text. The pool is split in two by a hash of each example's id: the *pretraining half* trains the tokenizer and the
base; the benchmark's pool subsample is drawn from the other half, so no candidate was seen in pretraining.
With ``--holdout-tasks T ... --unseen`` the base is pretrained without those tasks at all (its own cache), so a
held-out target is new to the base model as a task, as the paper's targets are to theirs.

A run (timed; only the base model is cached):

1. pool: one fixed random subsample of ``--pool-size`` examples of the selection half that fit ``--max-length``
   tokens (the same for every method; stated in the output);
2. LoRA warmup on a random 5% of it (``gist_index.warmup``); stores of its gradients at every checkpoint with
   ``gist_index.build``: ``sgd`` (GIST, MIPS) and ``adam`` (LESS), d = ``BuildConfig.dim``;
3. per target, a 5% selection by each method: random; LESS; GIST (exact scan); GIST re-ranked on exact
   gradients (``--rerank``); GIST with sub-tasks taking turns (``--subtasks round-robin``); MIPS (GIST through the FAISS
   index); RDS (cosine of mean-pooled last-layer hidden states, mean per sub-task, max); BM25 (bm25s; one query
   per sub-task from its validation texts, max);
4. LoRA fine-tuning of the same base on each selection with identical settings and 3 seeds; target test loss
   (mean per-token loss on the responses of a fixed test subsample) and exact match by greedy decoding where
   answers are short;
5. fidelity: per target, the overlap of the top 5% chosen from projected gradients (d = 1024, 4096, 8192) with
   the top 5% of exact GIST on raw gradients, on the same checkpoints. Raw gradients are streamed (never stored)
   and projected on the fly onto each target's exact subspace, which is the paper's formula; the projected
   scores use the package's CountSketch projector with the store's seed; d = 8192 is also read from the store;
6. outputs in ``--out``: quality.json, quality.md, PNG plots; the last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import re
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import gist_index as gi  # noqa: E402
from gist_index.config import DEFAULT_ENERGY, BuildConfig, LoraConfig, SelectConfig, TrainConfig  # noqa: E402
from gist_index.data import Example, encode, id_hash, read_examples  # noqa: E402
from gist_index.model import load_base_model, load_tokenizer, make_llama, save_model, train_tokenizer  # noqa: E402
from gist_index.progress import bar as progress_bar  # noqa: E402
from gist_index.train import evaluate_loss, pretrain_lm, train_lora  # noqa: E402

log = logging.getLogger("quality")
DATA = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "data"))
DEFAULT_TARGETS = [os.path.join(DATA, "targets", t) for t in ("gsm8k", "bbh", "rotten_tomatoes")]
DEFAULT_POOL = [os.path.join(DATA, "pool", f) for f in ("t0.jsonl.gz", "gsm8k_train.jsonl.gz")]


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseSpec:
    """The base model: tokenizer and Llama sizes, pretraining schedule (hashed into the cache directory)."""

    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 688
    max_positions: int = 512
    epochs: int = 1
    lr: float = 2e-3
    batch_size: int = 32
    max_length: int = 320
    seed: int = 0
    exclude: tuple[str, ...] = ()  # pool tasks kept out of pretraining (``--unseen``: held-out targets)

    def key(self, pool: Sequence[str]) -> str:
        """Cache key: the spec and the pool files' names and sizes (a base without exclusions keeps its old key)."""
        files = [(os.path.basename(p), os.path.getsize(p)) for p in pool]
        spec = asdict(self)
        if not self.exclude:
            spec.pop("exclude")
        else:
            spec["exclude"] = sorted(self.exclude)
        return hashlib.sha256(json.dumps([spec, files]).encode()).hexdigest()[:12]


def in_pretraining_half(rid: str) -> bool:
    """The fixed split of the pool: examples whose id hashes even train the tokenizer and the base model."""
    return id_hash(rid) % 2 == 0


def example_text(ex: Example) -> str:
    """The rendered text of an example (prompt and response, as the model sees it)."""
    return "".join(t for t, _ in ex.segments)


def read_pool(paths: Sequence[str]) -> list[Example]:
    """Every example of the pool files, in file order."""
    out = []
    for p in paths:
        out.extend(read_examples(p))
    return out


# ---------------------------------------------------------------------------------------------------------
# 1. The base model
# ---------------------------------------------------------------------------------------------------------
def base_model(pool_paths: Sequence[str], cache: str, spec: BaseSpec, progress: bool = True) -> tuple[str, dict]:
    """The cached base model directory (pretrained here the first time) and its record (pretraining time, loss)."""
    out = os.path.join(cache, f"base-{spec.key(pool_paths)}")
    record_file = os.path.join(out, "pretrain.json")
    if os.path.isfile(record_file) and os.path.isfile(os.path.join(out, "config.json")):
        with open(record_file) as fh:
            return out, json.load(fh)
    t0 = time.time()
    pool = read_pool(pool_paths)
    # the rendered text ends with the EOS string; pretrain_lm appends the EOS token itself
    excluded = set(spec.exclude)
    texts = [
        example_text(e).removesuffix("</s>") for e in pool if in_pretraining_half(e.id) and task_of(e) not in excluded
    ]
    print(
        f"[base] pretraining a Llama from scratch on {len(texts)} texts (the pretraining half of the pool"
        + (f", without the tasks {sorted(excluded)})" if excluded else ")")
    )
    tok = train_tokenizer(texts, vocab_size=spec.vocab_size)
    model = make_llama(
        tok,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_positions=spec.max_positions,
        seed=spec.seed,
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[base] {n_params / 1e6:.1f}M parameters; {spec.epochs} epochs, max {spec.max_length} tokens per text")
    losses = pretrain_lm(
        model,
        tok,
        texts,
        epochs=spec.epochs,
        lr=spec.lr,
        batch_size=spec.batch_size,
        max_length=spec.max_length,
        seed=spec.seed,
        progress=progress,
    )
    tmp = out + ".partial"
    save_model(model, tok, tmp)
    record = {
        "spec": asdict(spec),
        "n_texts": len(texts),
        "n_parameters": n_params,
        "pretrain_seconds": round(time.time() - t0, 1),
        "loss_first_100": float(np.mean(losses[:100])),
        "loss_last_100": float(np.mean(losses[-100:])),
        "steps": len(losses),
    }
    with open(os.path.join(tmp, "pretrain.json"), "w") as fh:
        json.dump(record, fh, indent=1)
    os.replace(tmp, out)
    print(
        f"[base] done in {record['pretrain_seconds']:.0f} s; loss {record['loss_first_100']:.2f} -> "
        f"{record['loss_last_100']:.2f}; cached at {out}"
    )
    return out, record


MIN_TEST = 30  # test examples a target needs to be measured


@dataclass(frozen=True)
class RunSpec:
    """Everything a run does besides the base model (the time plan in benchmarks/README.md is for these)."""

    pool_size: int = 4000  # examples in the fixed pool subsample
    max_length: int = 320  # tokens per example everywhere (pool, validation, test)
    fraction: float = 0.05  # warmup share of the pool, and the selection size
    lora_r: int = 8
    lora_alpha: float = 32.0  # scaling 4, as the paper's r=128, alpha=512
    lora_dropout: float = 0.1
    warmup_epochs: int = 2  # one checkpoint per epoch
    warmup_lr: float = 1e-3
    batch_size: int = 16
    ft_epochs: int = 3  # fine-tuning on a selection
    ft_lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    test_size: int = 300  # fixed random test subsample per target
    dims: tuple[int, ...] = (1024, 4096, 8192)  # fidelity
    dim: int = BuildConfig().dim  # the stores' dimension (the package default)
    store_dtype: str = "float16"  # the stores' vector type: the committed figures' (int8 changes them by a row or two)
    em_max_tokens: int = 8  # exact match on answers of at most this many tokens...
    em_min_share: float = 0.5  # ...for targets where at least this share of test answers is that short
    seed: int = 0  # pool and test subsamples, warmup
    holdout: tuple[str, ...] = ()  # pool tasks turned into extra targets (removed from the pool subsample)
    rerank: float = 3.0  # select --rerank: candidates as a multiple of the selection

    def key(self) -> str:
        """Cache key of the run's intermediate products (warmup, stores); float16 stores keep the older key."""
        spec = asdict(self)
        if spec["store_dtype"] == "float16":
            spec.pop("store_dtype")
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    def n_select(self, n_pool: int) -> int:
        """How many rows a selection keeps from a pool of ``n_pool``: ``fraction`` of it, at least one."""
        return max(1, int(round(self.fraction * n_pool)))

    @property
    def lora(self) -> LoraConfig:
        """The LoRA adapter of the warmup and of every fine-tuning run."""
        return LoraConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout)

    def train(self, epochs: int, lr: float, seed: int) -> TrainConfig:
        """A LoRA training configuration."""
        return TrainConfig(
            epochs=epochs,
            lr=lr,
            batch_size=self.batch_size,
            micro_batch_size=self.batch_size,
            max_length=self.max_length,
            seed=seed,
        )


class Timer:
    """Wall-clock seconds per named stage."""

    def __init__(self):
        self.t0 = time.time()
        self.c0 = time.process_time()
        self.stages: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def stage(self, name: str):
        """Context manager adding the time spent inside to ``name``."""
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t, self.c = time.time(), time.process_time()
                print(f"[{time.time() - timer.t0:7.0f} s] {name} ...", flush=True)

            def __exit__(self, *exc):
                timer.stages[name] = timer.stages.get(name, 0.0) + time.time() - self.t
                timer.cpu[name] = timer.cpu.get(name, 0.0) + time.process_time() - self.c

        return _Ctx()

    @property
    def total(self) -> float:
        """Seconds since the timer started."""
        return time.time() - self.t0

    @property
    def total_cpu(self) -> float:
        """CPU seconds of this process (all threads) since the timer started."""
        return time.process_time() - self.c0


# ---------------------------------------------------------------------------------------------------------
# 2. The pool subsample and the targets
# ---------------------------------------------------------------------------------------------------------
def fits(ex: Example, tok, max_length: int) -> bool:
    """The whole example (prompt and response) fits in ``max_length`` tokens."""
    enc = encode(ex, tok, max_length + 1)
    return not enc.truncated and enc.n_tokens <= max_length and enc.n_label_tokens > 0


def write_jsonl_gz(path: str, records: Sequence[dict]) -> str:
    """Write records as gzipped JSON Lines."""
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def held_tasks(groups: Sequence[str]) -> list[str]:
    """The pool tasks of ``--holdout-tasks`` entries (``task`` or ``task+task+...``), sorted."""
    return sorted({t for group in groups for t in group.split("+")})


def base_spec_for(holdout: Sequence[str], unseen: bool) -> BaseSpec:
    """The base model of a run: the standard one, or (``--unseen``) one pretrained without the held-out tasks."""
    return BaseSpec(exclude=tuple(held_tasks(holdout)) if unseen else ())


def unmeasurable(t: TargetData, spec: RunSpec) -> str | None:
    """Why a target cannot be measured (too few of its examples within the max length), else None."""
    if len(t.test) >= MIN_TEST and t.val:
        return None
    return f"{len(t.val)} validation and {len(t.test)} test examples fit in {spec.max_length} tokens"


def pool_subsample(pool: Sequence[Example], tok, spec: RunSpec, out: str) -> tuple[list[Example], dict]:
    """The fixed pool subsample (selection half, fits max-length, seeded), written to ``out``; and its description."""
    held = set(held_tasks(spec.holdout))
    half = [i for i, e in enumerate(pool) if not in_pretraining_half(e.id) and task_of(e) not in held]
    order = np.random.default_rng(spec.seed).permutation(len(half))
    chosen, tried = [], 0
    for j in order:
        tried += 1
        if fits(pool[half[j]], tok, spec.max_length):
            chosen.append(half[j])
            if len(chosen) == spec.pool_size:
                break
    chosen.sort()
    examples = [pool[i] for i in chosen]
    write_jsonl_gz(out, [e.record for e in examples])
    tasks: dict[str, int] = {}
    for e in examples:
        t = task_of(e)
        tasks[t] = tasks.get(t, 0) + 1
    desc = {
        "n": len(examples),
        "of_pool": len(pool),
        "selection_half": len(half),
        "fit_rate": round(len(chosen) / max(1, tried), 3),
        "rule": f"random (seed {spec.seed}) among the examples of the selection half (id hash odd) whose prompt and "
        f"response fit in {spec.max_length} tokens" + (f", without the tasks {sorted(held)}" if held else ""),
        "tasks": dict(sorted(tasks.items(), key=lambda kv: -kv[1])),
    }
    return examples, desc


def holdout_targets(pool: Sequence[Example], tok, spec: RunSpec, out: str) -> list[str]:
    """Targets made of pool tasks held out from the pool subsample (a check on targets never tuned for).

    Each ``spec.holdout`` entry is a task or ``task+task+...``; its examples come from the selection half (never
    pretrained on; with ``--unseen`` the base saw none of the task's examples). Validation: 8 examples of a
    single task, or 3 per task with ``subtask`` = task; test: the rest (the usual test subsample is drawn from
    it). Returns the target directories written under ``out``.
    """
    rng = np.random.default_rng(spec.seed + 1)
    dirs = []
    for group in spec.holdout:
        tasks = group.split("+")
        val, test = [], []
        for task in tasks:
            rows = [e for e in pool if task_of(e) == task and not in_pretraining_half(e.id)]
            if not rows:
                raise SystemExit(f"--holdout-tasks: no pool task {task!r}")
            rows = [rows[i] for i in rng.permutation(len(rows))]
            rows = [e for e in rows[: 8 + spec.test_size * 2] if fits(e, tok, spec.max_length)]
            n_val = 8 if len(tasks) == 1 else 3
            sub = {} if len(tasks) == 1 else {"subtask": task}
            val += [{**e.record, **sub} for e in rows[:n_val]]
            test += [{**e.record, **sub} for e in rows[n_val:]]
        d = os.path.join(out, group)
        os.makedirs(d, exist_ok=True)
        write_jsonl_gz(os.path.join(d, "val.jsonl.gz"), val)
        write_jsonl_gz(os.path.join(d, "test.jsonl.gz"), test)
        dirs.append(d)
    return dirs


def pool_store(
    base: str,
    ckpts: Sequence[str],
    work: str,
    grad: str,
    spec: RunSpec,
    progress: bool,
    projection: str = "countsketch",
) -> tuple[str, bool]:
    """The run's store of ``grad`` gradients (``work/pool-GRAD.gist``) of its pool subsample (``work/pool.jsonl.gz``),
    built unless a complete one is there; returns its path and whether it was built now. The committed figures'
    stores use ``countsketch``; another ``projection`` gets ``work/pool-GRAD-PROJECTION.gist`` (pca: the package
    defaults, a quarter of the subsample as its sample)."""
    suffix = "" if projection == "countsketch" else "-" + projection
    path = os.path.join(work, f"pool-{grad}{suffix}.gist")
    if os.path.isdir(path) and gi.info(path)["state"] == "complete":
        return path, False
    cfg = BuildConfig(
        dim=spec.dim, max_length=spec.max_length, gradient=grad, dtype=spec.store_dtype, projection=projection
    )
    gi.build(
        base, ckpts, [os.path.join(work, "pool.jsonl.gz")], path, cfg, overwrite=True, device="cpu", progress=progress
    )
    return path, True


def task_of(ex: Example) -> str:
    """The pool task of an example (its ``task`` field, else its file name)."""
    return str(ex.record.get("task") or os.path.basename(ex.path).split(".")[0])


def find_file(directory: str, stem: str) -> str:
    """``DIR/stem.jsonl.gz`` or ``DIR/stem.jsonl``."""
    for ext in (".jsonl.gz", ".jsonl"):
        p = os.path.join(directory, stem + ext)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{directory}: no {stem}.jsonl or {stem}.jsonl.gz")


def answer_text(ex: Example, eos: str) -> str:
    """The response text (label segments, without the EOS string)."""
    return "".join(t for t, lab in ex.segments if lab).removesuffix(eos).strip()


@dataclass
class TargetData:
    """A target: validation examples (for selection), a fixed test subsample, and the short-answer subset."""

    name: str
    val_file: str
    val: list[Example]
    test: list[Example]
    em_rows: list[int]  # indices into test of short answers (exact match), empty: no exact match

    @property
    def subtasks(self) -> list[str | None]:
        """The sub-task of each validation example."""
        return [e.subtask for e in self.val]


def load_target(directory: str, tok, spec: RunSpec) -> TargetData:
    """Read a target directory; draw its fixed test subsample among test examples that fit max-length."""
    name = os.path.basename(os.path.normpath(directory))
    val_file = find_file(directory, "val")
    val = list(read_examples(val_file, tok.eos_token))
    test_all = list(read_examples(find_file(directory, "test"), tok.eos_token))
    order = np.random.default_rng(spec.seed).permutation(len(test_all))
    test = []
    for j in order:
        if fits(test_all[j], tok, spec.max_length):
            test.append(test_all[j])
            if len(test) == spec.test_size:
                break
    short = [
        i
        for i, e in enumerate(test)
        if len(tok(answer_text(e, tok.eos_token), add_special_tokens=False)["input_ids"]) <= spec.em_max_tokens
    ]
    em_rows = short if len(short) >= spec.em_min_share * len(test) else []
    return TargetData(name, val_file, val, test, em_rows)


# ---------------------------------------------------------------------------------------------------------
# 3. Selection baselines (the gradient methods go through gist_index.select)
# ---------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------
# 5. Fidelity: projected GIST against exact GIST on raw gradients (streamed)
# ---------------------------------------------------------------------------------------------------------
def subspace_cosines(x: torch.Tensor, cs) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, n_subtasks] twice: the paper's per-checkpoint cosine, inside the subspace, with each sub-task
    direction (``gist``), and the same inner product over the norm of the whole gradient (``gist-full``)."""
    basis = torch.as_tensor(cs.basis, dtype=torch.float64)
    dirs = torch.as_tensor(cs.directions, dtype=torch.float64)
    x = x.double()
    coords = x @ basis
    dots = coords @ dirs.T
    return dots / coords.norm(dim=1, keepdim=True).clamp_min(1e-30), dots / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def streamed_scores(
    base: str,
    ckpts: Sequence[str],
    pool: Sequence[Example],
    targets: Sequence[TargetData],
    weights: Sequence[float],
    spec: RunSpec,
    variants: dict,
    progress: bool,
    block: int = 256,
    energy: float = DEFAULT_ENERGY,
) -> tuple[dict, dict, dict]:
    """Raw gradients of the pool, streamed (never stored), scored per target exactly (the paper's formula on the
    raw gradients and their exact subspace) and through each projection in ``variants`` (key -> (d, stored
    dtype): CountSketch with the store's seed; or (d, stored dtype, projector): that projector; the pool rows
    unit-normalised and rounded as a store of that dtype keeps them; the validation gradients projected at full
    precision, as select computes them; the rank k from ``energy``, as ``select --energy``). Returns (exact targets,
    projected targets per key, scores: per target, ``[rows, n_subtasks]`` per (gist variant, key), key ``"exact"``
    for exact)."""
    from gist_index.extract import CheckpointedModel
    from gist_index.project import IdentityProjector, make_projector
    from gist_index.store import to_stored, unit_rows
    from gist_index.subspace import build_target

    cm = CheckpointedModel(base, ckpts, "cpu")
    tok = cm.tokenizer
    ident = IdentityProjector(cm.source_dim)
    seed = BuildConfig().seed
    sketches = {
        v[0]: make_projector("countsketch", cm.source_dim, v[0], seed) for v in variants.values() if len(v) == 2
    }
    projs = {key: v[2] if len(v) > 2 else sketches[v[0]] for key, v in variants.items()}
    n_ck = len(ckpts)
    exact, proj = {}, {}
    for t in targets:
        enc = [encode(e, tok, spec.max_length) for e in t.val]
        keep = [i for i, e in enumerate(enc) if e.n_label_tokens > 0]  # as gist_index.select does
        enc, subtasks = [enc[i] for i in keep], [t.subtasks[i] for i in keep]
        V = [torch.from_numpy(cm.gradients(enc, c, ident, "sgd", 16)["vectors"]).double() for c in range(n_ck)]
        exact[t.name] = build_target([v.numpy() for v in V], subtasks, weights, energy=energy)
        pv = {key: [p.project(v.float()).double().numpy() for v in V] for key, p in projs.items()}
        proj[t.name] = {key: build_target(pv[key], subtasks, weights, energy=energy) for key in variants}
    enc = [encode(e, tok, spec.max_length) for e in pool]
    N = len(enc)
    acc = {
        t.name: {(v, k): np.zeros((N, len(exact[t.name].subtasks))) for v in VARIANTS for k in ["exact", *variants]}
        for t in targets
    }
    bar = progress_bar(total=N * n_ck, enabled=progress, desc="raw gradients", unit="ex")
    for c in range(n_ck):
        for s in range(0, N, block):
            G = torch.from_numpy(cm.gradients(enc[s : s + block], c, ident, "sgd", 16)["vectors"])
            Gp = {id(p): p.project(G) for p in projs.values()}
            Gk = {}
            for key, (_, dtype, *_) in variants.items():
                x = Gp[id(projs[key])]
                if dtype not in ("float32", "float64"):  # as stored: unit rows in that type, read back
                    xd = x.double().numpy()
                    unit = xd / np.maximum(np.linalg.norm(xd, axis=1), 1e-30)[:, None]
                    x = torch.from_numpy(unit_rows(to_stored(unit, dtype), np.float64))
                Gk[key] = x
            for t in targets:
                a, tgt = acc[t.name], exact[t.name]
                for v, cos in zip(VARIANTS, subspace_cosines(G, tgt.checkpoints[c])):
                    a[v, "exact"][s : s + len(G)] += tgt.weights[c] * cos.numpy()
                for key in variants:
                    p = proj[t.name][key]
                    for v, cos in zip(VARIANTS, subspace_cosines(Gk[key], p.checkpoints[c])):
                        a[v, key][s : s + len(G)] += p.weights[c] * cos.numpy()
            bar.update(len(G))
    bar.close()
    return exact, proj, acc


def fidelity(streamed: tuple[dict, dict, dict], targets: Sequence[TargetData], spec: RunSpec, N: int) -> dict:
    """From :func:`streamed_scores` with the variants ``{d: (d, "float32")}`` for each d of ``spec.dims``: exact
    GIST (raw gradients, exact subspace) against projected GIST (CountSketch at each d, the store's seed) on the
    same checkpoints; per target, the top-n rows of each and the validation spectra (``N`` pool rows)."""
    exact, proj, acc = streamed
    n = spec.n_select(N)
    out = {}
    for t in targets:
        a = acc[t.name]
        top = {k: top_rows(v.max(1), n) for k, v in a.items()}

        def overlap(v, d, top=top):
            return len(set(top[v, d].tolist()) & set(top[v, "exact"].tolist())) / n

        def reranked(v, d, a=a, top=top):
            # select --rerank R: the best R n rows of the projected scores, re-scored exactly, best n kept
            cand = top_rows(a[v, d].max(1), min(N, int(np.ceil(spec.rerank * n))))
            best = cand[top_rows(a[v, "exact"].max(1)[cand], n)]
            return len(set(best.tolist()) & set(top[v, "exact"].tolist())) / n

        out[t.name] = {
            "top_exact": top["gist", "exact"],
            "overlap": {d: overlap("gist", d) for d in spec.dims},
            "overlap_gist_full": {d: overlap("gist-full", d) for d in spec.dims},
            "overlap_rerank": {d: reranked("gist", d) for d in spec.dims},
            "overlap_gist_full_rerank": {d: reranked("gist-full", d) for d in spec.dims},
            "exact_gist_vs_gist_full": len(set(top["gist", "exact"].tolist()) & set(top["gist-full", "exact"].tolist()))
            / n,
            "rank_exact": exact[t.name].ranks,
            "rank_projected": {d: proj[t.name][d].ranks for d in spec.dims},
            "spectrum_exact": [c.singular_values.tolist() for c in exact[t.name].checkpoints],
            "score_corr": {
                d: float(np.corrcoef(a["gist", "exact"].max(1), a["gist", d].max(1))[0, 1]) for d in spec.dims
            },
        }
    return out


VARIANTS = ("gist", "gist-full")
FID_KEYS = (
    "overlap",
    "overlap_gist_full",
    "overlap_rerank",
    "overlap_gist_full_rerank",
    "rank_projected",
    "score_corr",
)


# ---------------------------------------------------------------------------------------------------------
# 6. Reporting
# ---------------------------------------------------------------------------------------------------------
METHODS = ("random", "less", "gist", "gist-rerank", "gist-rr", "mips", "rds", "bm25")


def summarise(values: Sequence[float]) -> dict:
    """Mean, standard deviation, min and max over seeds."""
    v = np.asarray(values, np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "seeds": v.tolist(),
    }


def goals(results: dict) -> dict:
    """The issue's goals, checked on the results: GIST below random beyond the seed spread on every target,
    no higher than LESS on most; fidelity at the default d >= 0.9."""
    out = {"gist_beats_random": {}, "gist_not_above_less": {}, "some_selection_beats_base": {}}
    for name, r in results["targets"].items():
        g, rnd, less = r["methods"]["gist"]["loss"], r["methods"]["random"]["loss"], r["methods"]["less"]["loss"]
        out["gist_beats_random"][name] = bool(g["max"] < rnd["min"])
        out["gist_not_above_less"][name] = bool(g["mean"] <= less["mean"])
        # headroom: does fine-tuning on some method's selection lower the loss below the base model's, every seed?
        base = r["base"]["loss"]
        out["some_selection_beats_base"][name] = any(m["loss"]["max"] < base for m in r["methods"].values())
    fid = results["fidelity"]["top5_overlap"]
    out["all_beat_random"] = all(out["gist_beats_random"].values())
    out["most_not_above_less"] = sum(out["gist_not_above_less"].values()) > len(out["gist_not_above_less"]) / 2
    out["fidelity_ok"] = bool(fid >= 0.9)
    out["fidelity_rerank_ok"] = bool(results["fidelity"]["store_mean_rerank"] >= 0.9)
    return out


def task_focus(shares: dict, pool_counts: dict) -> float:
    """Total variation distance between a selection's task shares and the pool's task counts (normalised)."""
    n = sum(pool_counts.values())
    keys = set(shares) | set(pool_counts)
    return 0.5 * sum(abs(shares.get(k, 0.0) - pool_counts.get(k, 0) / n) for k in keys)


def fmt_loss(s: dict) -> str:
    """``mean ± std`` (the min and max over seeds stay in the JSON)."""
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def loss_table(targets: Sequence[tuple[str, dict]], methods: Sequence[str]) -> list[str]:
    """Markdown lines: a row of test losses per (name, target results), the best in bold, ``-`` where a method
    is missing (a run older than it)."""
    lines = ["| target | base (no FT) | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for name, t in targets:
        best = min(v["loss"]["mean"] for v in t["methods"].values())
        cells = []
        for m in methods:
            v = t["methods"].get(m)
            c = "-" if v is None else fmt_loss(v["loss"])
            cells.append(f"**{c}**" if v is not None and v["loss"]["mean"] == best else c)
        lines.append(f"| {name} | {t['base']['loss']:.3f} | " + " | ".join(cells) + " |")
    return lines


@dataclass
class CachedRun:
    """What a finished run left in the cache: its settings, base model, run folder, tokenizer, pool subsample,
    targets, warmup checkpoints and their weights (``store`` is its sgd store)."""

    spec: RunSpec
    base: str
    work: str
    tok: object
    pool: list[Example]
    targets: list[TargetData]
    ckpts: list[str]
    weights: list[float]

    @property
    def store(self) -> str:
        """The run's sgd store (GIST)."""
        return os.path.join(self.work, "pool-sgd.gist")


def add_cached_run_args(ap: argparse.ArgumentParser) -> None:
    """The options naming a finished quality.py run (as given to it), for scripts that reuse its cache."""
    ap.add_argument("--no-default-targets", action="store_true", help="as given to quality.py")
    ap.add_argument("--holdout-tasks", nargs="*", default=[], help="as given to quality.py")
    ap.add_argument("--unseen", action="store_true", help="as given to quality.py")
    ap.add_argument("--warmup-epochs", type=int, default=RunSpec().warmup_epochs, help="as given to quality.py")
    ap.add_argument("--cache", default=os.path.join(HERE, "results", "cache"), help="quality.py's cache folder")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")


def cached_run(args: argparse.Namespace) -> CachedRun:
    """The finished run named by ``args`` (see :func:`add_cached_run_args`); sets the torch threads; exits with a
    message when that run has not been made."""
    torch.set_num_threads(args.threads)
    spec = RunSpec(holdout=tuple(args.holdout_tasks), warmup_epochs=args.warmup_epochs)
    key = base_spec_for(args.holdout_tasks, args.unseen).key(DEFAULT_POOL)
    base, work = os.path.join(args.cache, f"base-{key}"), os.path.join(args.cache, f"run-{spec.key()}-{key}")
    store = os.path.join(work, "pool-sgd.gist")
    if not os.path.isdir(store):
        raise SystemExit(f"{store}: not found; run benchmarks/quality.py with the same options first")
    tok = load_tokenizer(base)
    pool = list(read_examples(os.path.join(work, "pool.jsonl.gz"), tok.eos_token))
    dirs = ([] if args.no_default_targets else DEFAULT_TARGETS) + [
        os.path.join(work, "holdout", g) for g in args.holdout_tasks
    ]
    with open(os.path.join(work, "warmup", "warmup.json")) as fh:
        ckpts = json.load(fh)["checkpoints"]
    weights = gi.info(store)["checkpoint_weights"]
    targets = [t for t in (load_target(d, tok, spec) for d in dirs) if unmeasurable(t, spec) is None]  # as run()
    return CachedRun(spec, base, work, tok, pool, targets, ckpts, weights)


def markdown(results: dict) -> str:
    """The results as markdown tables."""
    R = results
    methods = [m for m in METHODS if any(m in t["methods"] for t in R["targets"].values())]
    lines = ["# quality.py results", ""]
    lines.append(
        f"Pool: {R['pool']['n']:,} examples: {R['pool']['rule']}. Selection: top {R['n_select']} "
        f"({100 * R['spec']['fraction']:.0f}%). Fine-tuning: {len(R['spec']['seeds'])} seeds per selection."
    )
    excluded = R["base"].get("spec", {}).get("exclude")
    if excluded:
        lines += ["", f"Base model pretrained without the tasks {', '.join(excluded)} (`--unseen`)."]
    for name, why in R.get("dropped_targets", {}).items():
        lines += ["", f"Target {name} not measured: only {why}."]
    lines += ["", "## Target test loss (mean ± std over seeds; lower is better)", ""]
    lines += loss_table(list(R["targets"].items()), methods)
    same = [
        f"{m} on {name} = {e['same_selection_as']}"
        for name, t in R["targets"].items()
        for m, e in t["methods"].items()
        if "same_selection_as" in e
    ]
    if same:
        lines += ["", "The same selection as another method (its fine-tunes reused): " + "; ".join(same) + "."]
    em_targets = {n: t for n, t in R["targets"].items() if "em" in t["base"]}
    if em_targets:
        lines += ["", "## Exact match (mean ± std over seeds; short-answer test examples)", ""]
        lines.append("| target | n | base (no FT) | " + " | ".join(methods) + " |")
        lines.append("|---|---|---|" + "---|" * len(methods))
        for name, t in em_targets.items():
            cells = [f"{t['methods'][m]['em']['mean']:.3f} ± {t['methods'][m]['em']['std']:.3f}" for m in methods]
            lines.append(f"| {name} | {t['n_em']} | {t['base']['em']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "## Fidelity: top-5% overlap with exact GIST on raw gradients (same checkpoints)", ""]
    dims = R["spec"]["dims"]
    lines.append("| target | rank k exact | " + " | ".join(f"d={d}" for d in dims) + " | store (d=8192) |")
    lines.append("|---|---|" + "---|" * len(dims) + "---|")
    for name, f in R["fidelity"]["targets"].items():
        cells = [f"{f['overlap'][str(d)]:.3f}" for d in dims]
        lines.append(f"| {name} | {f['rank_exact']} | " + " | ".join(cells) + f" | {f['store_overlap']:.3f} |")
    mean_row = [f"{R['fidelity']['mean_overlap'][str(d)]:.3f}" for d in dims]
    lines.append("| **mean** | | " + " | ".join(mean_row) + f" | {R['fidelity']['store_mean']:.3f} |")
    lines += ["", "The same for `gist-full` (cosine with the whole gradient; `mips` searches its score):", ""]
    lines.append("| target | exact top-5% shared with exact gist | " + " | ".join(f"d={d}" for d in dims) + " |")
    lines.append("|---|---|" + "---|" * len(dims))
    for name, f in R["fidelity"]["targets"].items():
        cells = [f"{f['overlap_gist_full'][str(d)]:.3f}" for d in dims]
        lines.append(f"| {name} | {f['exact_gist_vs_gist_full']:.3f} | " + " | ".join(cells) + " |")
    mean_row = [f"{R['fidelity']['mean_overlap_gist_full'][str(d)]:.3f}" for d in dims]
    lines.append("| **mean** | | " + " | ".join(mean_row) + " |")
    rr = R["spec"]["rerank"]
    lines += [
        "",
        f"With `select --rerank {rr:g}` (the best {rr:g} x N rows of the projected scores re-scored on exact "
        "gradients, the best N kept): the same overlap, computed from the streamed scores, and (last column) "
        "of the selection `gist_index` made from the store:",
        "",
    ]
    lines.append("| target | " + " | ".join(f"gist d={d}" for d in dims) + " | gist-full d=8192 | store (d=8192) |")
    lines.append("|---|" + "---|" * len(dims) + "---|---|")
    for name, f in R["fidelity"]["targets"].items():
        cells = [f"{f['overlap_rerank'][str(d)]:.3f}" for d in dims]
        cells += [f"{f['overlap_gist_full_rerank'][str(dims[-1])]:.3f}", f"{f['store_overlap_rerank']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    mean_row = [f"{R['fidelity']['mean_overlap_rerank'][str(d)]:.3f}" for d in dims]
    mean_row += [
        f"{R['fidelity']['mean_overlap_gist_full_rerank'][str(dims[-1])]:.3f}",
        f"{R['fidelity']['store_mean_rerank']:.3f}",
    ]
    lines.append("| **mean** | " + " | ".join(mean_row) + " |")
    lines += ["", "## What each method selected (largest pool tasks in the selection, share)", ""]
    lines.append(
        "Focus: the total variation distance between the selection's mix of pool tasks and the pool's own "
        "(0: the pool's mix; a random 5% scores about 0.12; 1: only tasks the pool barely has)."
    )
    lines.append("")
    lines.append("| target | method | rank k | focus | top tasks |")
    lines.append("|---|---|---|---|---|")
    for name, t in R["targets"].items():
        for m in methods:
            mt = t["methods"][m]
            tops = ", ".join(f"{k} {v:.0%}" for k, v in list(mt["tasks"].items())[:4])
            focus = task_focus(mt["tasks"], R["pool"]["tasks"])
            lines.append(f"| {name} | {m} | {mt.get('rank', '')} | {focus:.2f} | {tops} |")
    g = R["goals"]
    lines += ["", "## Goals", ""]
    lines.append(
        f"* GIST below random beyond the seed spread on every target: {g['all_beat_random']} ({g['gist_beats_random']})"
    )
    lines.append(f"* GIST no higher than LESS on most targets: {g['most_not_above_less']} ({g['gist_not_above_less']})")
    if "some_selection_beats_base" in g:
        lines.append(
            "* headroom: some method's selection lowers the loss below the base model's, with every seed "
            f"({g['some_selection_beats_base']}; where none does, fine-tuning on this pool only hurts the target "
            "and the methods are ranked by how little they hurt)"
        )
    lines.append(f"* fidelity at d={R['spec']['dim']} >= 0.9: {g['fidelity_ok']} ({R['fidelity']['top5_overlap']:.3f})")
    lines.append(
        f"* the same with `--rerank {R['spec']['rerank']:g}`: {g['fidelity_rerank_ok']} "
        f"({R['fidelity']['store_mean_rerank']:.3f})"
    )
    lines += ["", "## Time", ""]
    lines.append(
        f"Total {R['seconds']['total'] / 60:.1f} min with the cached base model "
        f"(pretraining it took {R['base']['pretrain_seconds'] / 60:.1f} min once); "
        f"reused caches: {R['reused'] or 'none'}."
    )
    lines.append("")
    lines.append(
        f"CPU time of the process {R['seconds']['cpu_total'] / 60:.1f} min on {R['seconds']['threads']} threads "
        f"(the machine is shared: wall time above CPU time / threads means other jobs took cores)."
    )
    lines.append("")
    lines.append("| stage | wall seconds | CPU seconds |")
    lines.append("|---|---|---|")
    for k, v in R["seconds"]["stages"].items():
        lines.append(f"| {k} | {v:.0f} | {R['seconds']['cpu_stages'][k]:.0f} |")
    return "\n".join(lines) + "\n"


def plots(results: dict, out: str) -> list[str]:
    """PNG plots: target loss per method and target; fidelity against d; the validation spectra."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = results
    files = []
    names = list(R["targets"])
    methods = [m for m in METHODS if m in R["targets"][names[0]]["methods"]]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        t = R["targets"][name]["methods"]
        means = [t[m]["loss"]["mean"] for m in methods]
        lo = [t[m]["loss"]["mean"] - t[m]["loss"]["min"] for m in methods]
        hi = [t[m]["loss"]["max"] - t[m]["loss"]["mean"] for m in methods]
        colors = ["#999999" if m == "random" else "#d62728" if m == "gist" else "#1f77b4" for m in methods]
        ax.bar(methods, means, yerr=[lo, hi], color=colors, capsize=3)
        spread = max(means) - min(means)
        ax.set_ylim(min(means) - max(0.5 * spread, 0.02), max(means) + max(0.5 * spread, 0.02))
        ax.set_title(name)
        ax.set_ylabel("test loss (min/max over seeds)")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    files.append(os.path.join(out, "quality_loss.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    dims = R["spec"]["dims"]
    for name, f in R["fidelity"]["targets"].items():
        ax.plot(dims, [f["overlap"][str(d)] for d in dims], "o-", label=name)
    ax.plot(dims, [R["fidelity"]["mean_overlap"][str(d)] for d in dims], "k--", label="mean")
    ax.plot(dims, [R["fidelity"]["mean_overlap_gist_full"][str(d)] for d in dims], "k:", label="gist-full, mean")
    ax.plot(dims, [R["fidelity"]["mean_overlap_rerank"][str(d)] for d in dims], "k-.", label="gist --rerank, mean")
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("projected dimension d")
    ax.set_ylabel("top-5% overlap with the exact scores")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(os.path.join(out, "quality_fidelity.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, f in R["fidelity"]["targets"].items():
        s2 = np.asarray(f["spectrum_exact"][-1]) ** 2
        cum = np.cumsum(s2) / s2.sum()
        line = ax.plot(np.arange(1, len(cum) + 1), cum, ".-", label=f"{name} (k={f['rank_exact'][-1]})")[0]
        k = f["rank_exact"][-1]
        ax.plot([k], [cum[k - 1]], "o", ms=9, mfc="none", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("k (singular directions of the validation gradients)")
    ax.set_ylabel("share of squared singular values")
    ax.set_title("validation spectrum, last checkpoint (exact)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(os.path.join(out, "quality_spectrum.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def run(args, base: str, base_record: dict, spec: RunSpec, base_spec: BaseSpec = BaseSpec()) -> dict:
    """Everything after the base model; returns the results (also written to ``args.out``)."""
    import shutil

    import bm25s

    timer = Timer()
    tok = load_tokenizer(base)
    work = os.path.join(args.cache, f"run-{spec.key()}-{base_spec.key(args.pool)}")
    reused = []
    if not args.reuse and os.path.isdir(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    target_dirs = ([] if args.no_default_targets else DEFAULT_TARGETS) + list(args.targets)

    with timer.stage("pool subsample and targets"):
        pool_file = os.path.join(work, "pool.jsonl.gz")
        pool_all = read_pool(args.pool)
        pool, pool_desc = pool_subsample(pool_all, tok, spec, pool_file)
        target_dirs += holdout_targets(pool_all, tok, spec, os.path.join(work, "holdout"))
        del pool_all
        pool = list(read_examples(pool_file, tok.eos_token))
        targets = [load_target(d, tok, spec) for d in target_dirs]
    print(f"      pool: {pool_desc['n']} examples ({pool_desc['rule']})")
    for t in targets:
        print(
            f"      target {t.name}: {len(t.val)} val, {len(t.test)} test"
            + (f", exact match on {len(t.em_rows)}" if t.em_rows else "")
        )
    # a target whose examples do not fit in max_length (a held-out task of long texts) cannot be measured
    dropped = {t.name: why for t in targets if (why := unmeasurable(t, spec)) is not None}
    for name, why in dropped.items():
        print(f"      target {name} dropped: only {why} (at least {MIN_TEST} test examples needed)")
    targets = [t for t in targets if t.name not in dropped]
    if not targets:
        raise SystemExit("no target left to measure")
    n_select = spec.n_select(len(pool))

    with timer.stage("warmup"):
        warm = os.path.join(work, "warmup")
        record = os.path.join(warm, "warmup.json")
        if os.path.isfile(record):
            with open(record) as fh:
                ckpts = json.load(fh)["checkpoints"]
            reused.append("warmup")
        else:
            ckpts = gi.warmup(
                base,
                [pool_file],
                warm,
                fraction=spec.fraction,
                lora=spec.lora,
                train=spec.train(spec.warmup_epochs, spec.warmup_lr, spec.seed),
                device="cpu",
                progress=args.progress,
            )
    stores = {}
    for grad in ("sgd", "adam"):
        with timer.stage(f"store ({grad})"):
            stores[grad], built = pool_store(base, ckpts, work, grad, spec, args.progress)
            if not built:
                reused.append(f"store-{grad}")
    info = gi.info(stores["sgd"])
    weights = info["checkpoint_weights"]

    pool_ids = [e.id for e in pool]
    row_of = {rid: i for i, rid in enumerate(pool_ids)}
    selections: dict[str, dict[str, np.ndarray]] = {t.name: {} for t in targets}
    reports: dict[str, dict[str, dict]] = {t.name: {} for t in targets}
    with timer.stage("select: less, gist, mips"):
        for t in targets:
            for name, method, store, rr, merge in (
                ("less", "less", "adam", 0, "max"),
                ("gist", "gist", "sgd", 0, "max"),
                ("gist-rerank", "gist", "sgd", spec.rerank, "max"),
                ("gist-rr", "gist", "sgd", 0, "round-robin"),
                ("mips", "mips", "sgd", 0, "max"),
                ("gist-full", "gist-full", "sgd", 0, "max"),
            ):
                sel = gi.select(
                    stores[store],
                    [t.val_file],
                    None,
                    SelectConfig(method=method, top=n_select, rerank=rr, subtasks=merge),
                    device="cpu",
                    progress=False,
                )
                selections[t.name][name] = np.asarray([row_of[i] for i in sel.ids])
                rep = sel.report()
                reports[t.name][name] = {
                    k: rep[k] for k in ("rank", "energy_captured", "seconds", "rerank") if k in rep
                }
    with timer.stage("select: rds"):
        from gist_index.extract import CheckpointedModel

        cm = CheckpointedModel(base, ckpts[-1:], "cpu")
        pool_h = mean_hidden_states(cm.pm, tok, pool, spec.max_length, args.progress)
        for t in targets:
            val_h = mean_hidden_states(cm.pm, tok, t.val, spec.max_length)
            selections[t.name]["rds"] = top_rows(per_subtask_max(pool_h @ val_h.T, t.subtasks), n_select)
        del cm
    with timer.stage("select: bm25"):
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        retriever = bm25s.BM25()
        retriever.index(
            bm25s.tokenize([example_text(e) for e in pool], stopwords="en", show_progress=False), show_progress=False
        )
        for t in targets:
            selections[t.name]["bm25"] = top_rows(bm25_scores(retriever, t.val), n_select)

    with timer.stage("fidelity (raw gradients, streamed)"):
        # the rank rule of select's default, as the gist column uses it; runs before the default became every
        # direction (energy 1) cached their fidelity at 0.9 under the plain name
        energy = SelectConfig().energy
        prefix = "fidelity3-" if energy == 0.9 else f"fidelity3e{energy:g}-"
        fid_file = os.path.join(
            work, prefix + hashlib.sha256(repr([t.val_file for t in targets]).encode()).hexdigest()[:8] + ".json"
        )
        if os.path.isfile(fid_file):
            with open(fid_file) as fh:
                fid = json.load(fh)
            for f in fid.values():
                f["top_exact"] = np.asarray(f["top_exact"])
                for key in FID_KEYS:
                    f[key] = {int(d): v for d, v in f[key].items()}
            reused.append("fidelity")
        else:
            variants = {d: (d, "float32") for d in spec.dims}
            streamed = streamed_scores(
                base, ckpts, pool, targets, weights, spec, variants, args.progress, energy=energy
            )
            fid = fidelity(streamed, targets, spec, len(pool))
            with open(fid_file, "w") as fh:
                json.dump({n: {**f, "top_exact": f["top_exact"].tolist()} for n, f in fid.items()}, fh)
    with open(os.path.join(work, "selections.json"), "w") as fh:  # for later analysis: pool ids, best first
        sel_ids = {t: {m: [pool_ids[int(r)] for r in rows] for m, rows in v.items()} for t, v in selections.items()}
        for t in targets:
            sel_ids[t.name]["gist_exact_raw"] = [pool_ids[int(r)] for r in fid[t.name]["top_exact"]]
        json.dump(sel_ids, fh)

    runs = [("random", None, s) for s in spec.seeds] + [
        (m, t.name, s) for t in targets for m in METHODS if m != "random" for s in spec.seeds
    ]
    scores: dict[str, dict[str, list[dict]]] = {t.name: {m: [] for m in METHODS} for t in targets}
    same_as: dict[str, dict[str, str]] = {t.name: {} for t in targets}
    by_name = {t.name: t for t in targets}
    with timer.stage("fine-tune and evaluate"):
        base_model_ = load_base_model(base)
        base_eval = {t.name: evaluate(base_model_, tok, t, spec) for t in targets}
        del base_model_
        bar = progress_bar(total=len(runs), enabled=args.progress, desc="fine-tune", unit="run")
        # a method that selected exactly the rows (in order) of one already fine-tuned with this seed is not
        # fine-tuned again (gist-rr is gist on a target with one sub-task): the same run would follow
        done: dict[tuple, tuple[str, dict]] = {}
        for method, tname, seed in runs:
            if method == "random":
                rows = np.sort(np.random.default_rng(1000 + seed).choice(len(pool), n_select, replace=False))
                evals = targets
            else:
                rows = selections[tname][method]
                evals = [by_name[tname]]
                key = (tname, rows.tobytes(), seed)
                if key in done:
                    same_as[tname][method] = done[key][0]
                    scores[tname][method].append(done[key][1])
                    bar.update(1)
                    continue
            pm = finetune(base, tok, [pool[int(r)] for r in rows], spec, seed)
            for t in evals:
                scores[t.name][method].append(evaluate(pm, tok, t, spec))
                if method == "random" and seed == spec.seeds[0]:
                    selections[t.name]["random"] = rows
            if method != "random":
                done[key] = (method, scores[tname][method][-1])
            bar.update(1)
            bar.set_postfix(run=f"{method}/{tname or 'all'}/{seed}")
            del pm
        bar.close()

    results = {
        "spec": {**asdict(spec), "seeds": list(spec.seeds), "dims": list(spec.dims)},
        "base": {"path": base, **base_record},
        "pool": pool_desc,
        "n_select": n_select,
        "store": {k: info[k] for k in ("n_examples", "bytes_per_example", "checkpoint_weights", "projection")},
        "targets": {},
        "reused": reused,
        "dropped_targets": dropped,
    }
    store_overlaps = []
    for t in targets:
        methods = {}
        for m in METHODS:
            rows = selections[t.name][m]
            tasks: dict[str, int] = {}
            for r in rows:
                k = task_of(pool[int(r)])
                tasks[k] = tasks.get(k, 0) + 1
            entry = {
                "loss": summarise([s["loss"] for s in scores[t.name][m]]),
                "tasks": {k: round(v / len(rows), 4) for k, v in sorted(tasks.items(), key=lambda kv: -kv[1])},
                "overlap_with_gist": round(
                    len(set(rows.tolist()) & set(selections[t.name]["gist"].tolist())) / n_select, 4
                ),
            }
            if t.em_rows:
                entry["em"] = summarise([s["em"] for s in scores[t.name][m]])
            if m in reports[t.name]:
                entry.update(reports[t.name][m])
            if m in same_as[t.name]:
                entry["same_selection_as"] = same_as[t.name][m]
            if m == "mips":  # mips searches gist-full's score: how much of the exact gist-full top-N it found
                full = set(selections[t.name]["gist-full"].tolist())
                entry["overlap_with_exact_gist_full"] = round(len(set(rows.tolist()) & full) / n_select, 4)
            methods[m] = entry
        results["targets"][t.name] = {
            "n_val": len(t.val),
            "n_test": len(t.test),
            "n_em": len(t.em_rows),
            "base": base_eval[t.name],
            "methods": methods,
        }
        f = fid[t.name]
        store_ov = len(set(selections[t.name]["gist"].tolist()) & set(f["top_exact"].tolist())) / n_select
        store_overlaps.append(store_ov)
        f["store_overlap"] = store_ov
        f["store_overlap_rerank"] = (
            len(set(selections[t.name]["gist-rerank"].tolist()) & set(f["top_exact"].tolist())) / n_select
        )
    dims = list(spec.dims)
    results["fidelity"] = {
        "top5_overlap": float(np.mean([fid[t.name]["overlap"][spec.dim] for t in targets]))
        if spec.dim in dims
        else float(np.mean(store_overlaps)),
        "d": spec.dim,
        "mean_overlap": {str(d): float(np.mean([fid[t.name]["overlap"][d] for t in targets])) for d in dims},
        **{
            f"mean_{key}": {str(d): float(np.mean([fid[t.name][key][d] for t in targets])) for d in dims}
            for key in ("overlap_gist_full", "overlap_rerank", "overlap_gist_full_rerank")
        },
        "store_mean": float(np.mean(store_overlaps)),
        "store_mean_rerank": float(np.mean([fid[t.name]["store_overlap_rerank"] for t in targets])),
        "targets": {
            t.name: {
                **{k: v for k, v in fid[t.name].items() if k != "top_exact"},
                **{key: {str(d): v for d, v in fid[t.name][key].items()} for key in FID_KEYS},
            }
            for t in targets
        },
    }
    results["goals"] = goals(results)
    results["seconds"] = {
        "total": round(timer.total, 1),
        "cpu_total": round(timer.total_cpu, 1),
        "threads": torch.get_num_threads(),
        "stages": {k: round(v, 1) for k, v in timer.stages.items()},
        "cpu_stages": {k: round(v, 1) for k, v in timer.cpu.items()},
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    return results


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    d = RunSpec()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", nargs="+", default=DEFAULT_POOL, help="pool files")
    ap.add_argument("--targets", nargs="*", default=[], help="more target directories (val + test files each)")
    ap.add_argument("--no-default-targets", action="store_true", help="only the --targets given")
    ap.add_argument("--cache", default=os.path.join(HERE, "results", "cache"), help="cache folder (git-ignored)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="where results and plots go")
    ap.add_argument(
        "--holdout-tasks",
        nargs="*",
        default=[],
        help="pool tasks (or task+task groups) to hold out of the pool and use as extra targets",
    )
    ap.add_argument(
        "--unseen",
        action="store_true",
        help="keep the --holdout-tasks out of the base model's pretraining too (a cached base per set of tasks)",
    )
    ap.add_argument("--base", help="use this base model directory instead of the cached one")
    ap.add_argument("--base-only", action="store_true", help="only pretrain (and cache) the base model")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the warmup and stores of an earlier identical run "
        "(the reported time is then not that of a full run)",
    )
    ap.add_argument("--pool-size", type=int, default=d.pool_size, help=f"pool subsample (default {d.pool_size})")
    ap.add_argument("--test-size", type=int, default=d.test_size, help=f"test subsample (default {d.test_size})")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="fine-tuning seeds")
    ap.add_argument(
        "--warmup-epochs",
        type=int,
        default=d.warmup_epochs,
        help=f"warmup epochs, one checkpoint each (default {d.warmup_epochs})",
    )
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    """Run the benchmark; print the tables; the last printed line is the JSON summary."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    os.makedirs(args.cache, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    if args.unseen and not args.holdout_tasks:
        raise SystemExit("--unseen: give the tasks to keep out of pretraining with --holdout-tasks")
    held = held_tasks(args.holdout_tasks)
    if held:  # fail before a long pretraining, not after
        known = {task_of(e) for e in read_pool(args.pool)}
        if set(held) - known:
            raise SystemExit(f"--holdout-tasks: no pool task {sorted(set(held) - known)}; the pool has {sorted(known)}")
    base_spec = base_spec_for(args.holdout_tasks, args.unseen)
    if args.base:
        base, base_record = args.base, {"pretrain_seconds": float("nan"), "note": "given with --base"}
    else:
        base, base_record = base_model(args.pool, args.cache, base_spec, args.progress)
    if args.base_only:
        print(json.dumps({"base": base, **base_record}))
        return
    spec = RunSpec(
        pool_size=args.pool_size,
        test_size=args.test_size,
        seeds=tuple(args.seeds),
        holdout=tuple(args.holdout_tasks),
        warmup_epochs=args.warmup_epochs,
    )
    results = run(args, base, base_record, spec, base_spec)
    with open(os.path.join(args.out, "quality.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    md = markdown(results)
    with open(os.path.join(args.out, "quality.md"), "w") as fh:
        fh.write(md)
    files = plots(results, args.out)
    print(md)
    print("plots: " + ", ".join(files))
    fid_full = results["fidelity"]["mean_overlap_gist_full"][str(results["fidelity"]["d"])]
    summary = {
        "targets": {
            n: {m: round(v["loss"]["mean"], 4) for m, v in t["methods"].items()} for n, t in results["targets"].items()
        },
        "fidelity": {
            "top5_overlap": round(results["fidelity"]["top5_overlap"], 4),
            "top5_overlap_gist_full": round(fid_full, 4),
            "top5_overlap_rerank": round(results["fidelity"]["store_mean_rerank"], 4),
            "d": results["fidelity"]["d"],
            **{f"d{d}": round(v, 4) for d, v in results["fidelity"]["mean_overlap"].items()},
        },
        "seconds": results["seconds"]["total"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
