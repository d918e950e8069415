"""quality.py's pool subsample, its targets (given or held out of the pool), and the run's gradient stores."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import gist_index as gi
from benchmarks.qualitylib.settings import MIN_TEST, BaseSpec, RunSpec, in_pretraining_half, task_of
from gist_index.config import BuildConfig
from gist_index.data import Example, encode, read_examples


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


def store_path(work: str, grad: str, spec: RunSpec, projection: str | None = None) -> str:
    """Where a run keeps its store of ``grad`` gradients: ``work/pool-GRAD.gist`` with the run's projection
    (``spec.projection``), ``work/pool-GRAD-PROJECTION.gist`` with another."""
    suffix = "" if projection in (None, spec.projection) else "-" + projection
    return os.path.join(work, f"pool-{grad}{suffix}.gist")


def pool_store(
    base: str,
    ckpts: Sequence[str],
    work: str,
    grad: str,
    spec: RunSpec,
    progress: bool,
    projection: str | None = None,
) -> tuple[str, bool]:
    """The run's store of ``grad`` gradients (``work/pool-GRAD.gist``) of its pool subsample (``work/pool.jsonl.gz``),
    built with the run's projection (``spec.projection``) unless a complete one is there; returns its path and
    whether it was built now. Another ``projection`` gets ``work/pool-GRAD-PROJECTION.gist`` (pca: build's default
    sample, a quarter of the subsample)."""
    projection = projection or spec.projection
    path = store_path(work, grad, spec, projection)
    if os.path.isdir(path) and gi.info(path)["state"] == "complete":
        return path, False
    cfg = BuildConfig(
        dim=spec.dim, max_length=spec.max_length, gradient=grad, dtype=spec.store_dtype, projection=projection
    )
    gi.build(
        base, ckpts, [os.path.join(work, "pool.jsonl.gz")], path, cfg, overwrite=True, device="cpu", progress=progress
    )
    return path, True


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
