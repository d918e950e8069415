"""quality.py's settings (the base model's and the run's, each hashed into its cache folder), the base model
pretrained once and cached, and a stage timer."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from gist_index.config import BuildConfig, LoraConfig, TrainConfig
from gist_index.data import Example, id_hash, read_examples
from gist_index.model import make_llama, save_model, train_tokenizer
from gist_index.train import pretrain_lm

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
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


def task_of(ex: Example) -> str:
    """The pool task of an example (its ``task`` field, else its file name)."""
    return str(ex.record.get("task") or os.path.basename(ex.path).split(".")[0])


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
    store_dtype: str = BuildConfig().vector_dtype  # the stores' vector type (the package default; float16 earlier)
    projection: str = BuildConfig().projection  # the stores' projection (the package default; countsketch earlier)
    em_max_tokens: int = 8  # exact match on answers of at most this many tokens...
    em_min_share: float = 0.5  # ...for targets where at least this share of test answers is that short
    seed: int = 0  # pool and test subsamples, warmup
    holdout: tuple[str, ...] = ()  # pool tasks turned into extra targets (removed from the pool subsample)
    rerank: float = 3.0  # select --rerank: candidates as a multiple of the selection

    def key(self) -> str:
        """Cache key of the run's intermediate products (warmup, stores); float16 CountSketch stores (the earlier
        runs') keep the older key."""
        spec = asdict(self)
        if spec["store_dtype"] == "float16":
            spec.pop("store_dtype")
        if spec["projection"] == "countsketch":
            spec.pop("projection")
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
