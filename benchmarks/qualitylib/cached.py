"""A finished quality.py run, named by its options: what the scripts that reuse its cache need."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch

import gist_index as gi
from benchmarks.qualitylib.settings import DEFAULT_POOL, DEFAULT_TARGETS, HERE, RunSpec
from benchmarks.qualitylib.targets import TargetData, base_spec_for, load_target, store_path, unmeasurable
from gist_index.data import Example, read_examples
from gist_index.model import load_tokenizer


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
        return store_path(self.work, "sgd", self.spec)


def add_store_args(ap: argparse.ArgumentParser) -> None:
    """The stores' projection and vector type (the package's defaults; the runs before 2026-12-06 used
    ``--projection countsketch --store-dtype float16``)."""
    d = RunSpec()
    ap.add_argument(
        "--projection",
        default=d.projection,
        choices=["countsketch", "pca"],
        help=f"the stores' projection (default {d.projection}, build's)",
    )
    ap.add_argument(
        "--store-dtype",
        default=d.store_dtype,
        choices=["float16", "float32", "int8"],
        help=f"the stores' vector type (default {d.store_dtype}, build's)",
    )


def add_cached_run_args(ap: argparse.ArgumentParser) -> None:
    """The options naming a finished quality.py run (as given to it), for scripts that reuse its cache."""
    ap.add_argument("--no-default-targets", action="store_true", help="as given to quality.py")
    ap.add_argument("--holdout-tasks", nargs="*", default=[], help="as given to quality.py")
    ap.add_argument("--unseen", action="store_true", help="as given to quality.py")
    ap.add_argument("--warmup-epochs", type=int, default=RunSpec().warmup_epochs, help="as given to quality.py")
    add_store_args(ap)
    ap.add_argument("--cache", default=os.path.join(HERE, "results", "cache"), help="quality.py's cache folder")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")


def cached_run(args: argparse.Namespace) -> CachedRun:
    """The finished run named by ``args`` (see :func:`add_cached_run_args`); sets the torch threads; exits with a
    message when that run has not been made."""
    torch.set_num_threads(args.threads)
    spec = RunSpec(
        holdout=tuple(args.holdout_tasks),
        warmup_epochs=args.warmup_epochs,
        projection=args.projection,
        store_dtype=args.store_dtype,
    )
    key = base_spec_for(args.holdout_tasks, args.unseen).key(DEFAULT_POOL)
    base, work = os.path.join(args.cache, f"base-{key}"), os.path.join(args.cache, f"run-{spec.key()}-{key}")
    store = store_path(work, "sgd", spec)
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
