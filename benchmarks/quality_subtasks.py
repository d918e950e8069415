"""Sub-task handling, ablated: GIST's max over sub-tasks against a round-robin over sub-tasks.

The paper scores each training example by its best sub-task (``max_s``) and keeps the top N. With few validation
examples per sub-task, one sub-task whose direction happens to line up with a large part of the pool can take
most of the selection. The round-robin variant gives every sub-task an equal share: sub-tasks take turns, each
taking its best example not yet taken (the same per-sub-task scores, only the merge differs). This script
measures both on the targets with more than one sub-task of a finished ``benchmarks/quality.py`` run (its cache:
base model, pool subsample, sgd store), fine-tuning with quality.py's settings and seeds. The per-sub-task scores
are computed here from the store's vectors (and merged with the package's rules, whose merge the tests check
against a numpy reference); the script checks that ``select --subtasks max`` (the default, quality.py's ``gist``)
and ``select --subtasks round-robin``, which scan the store themselves, pick exactly the same rows.

Reproduce::

    python benchmarks/quality.py --warmup-epochs 4 --out DIR       # once, caches everything (bbh: 14 sub-tasks)
    python benchmarks/quality_subtasks.py --warmup-epochs 4
    python benchmarks/quality.py --no-default-targets --holdout-tasks dbpedia_14 xsum+quarel+social_i_qa --out DIR
    python benchmarks/quality_subtasks.py --no-default-targets --holdout-tasks dbpedia_14 xsum+quarel+social_i_qa
    python benchmarks/quality_subtasks.py --no-finetune ...   # only the selections and their sub-task counts

Writes benchmarks/results/quality_subtasks[-NAME].json; the last printed line is one JSON object of mean losses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gist_index as gi  # noqa: E402
from benchmarks.qualitylib.cached import add_cached_run_args, cached_run  # noqa: E402
from benchmarks.qualitylib.fidelity import subspace_cosines  # noqa: E402
from benchmarks.qualitylib.methods import evaluate, finetune  # noqa: E402
from benchmarks.qualitylib.report import summarise  # noqa: E402
from benchmarks.qualitylib.settings import HERE, task_of  # noqa: E402
from gist_index.config import SelectConfig  # noqa: E402
from gist_index.store import GradientStore  # noqa: E402
from gist_index.subspace import best_first, round_robin  # noqa: E402


def subtask_scores(store_path: str, target) -> np.ndarray:
    """[rows, n_subtasks]: the paper's checkpoint-weighted in-subspace cosine with each sub-task direction
    (-inf for rows without a gradient)."""
    store = GradientStore.open(store_path)
    out = np.full((store.n_rows, len(target.subtasks)), -np.inf)
    for start, stop, vecs, valid in store.iter_chunks():
        total = 0.0
        for w, cs, x in zip(target.weights, target.checkpoints, vecs):
            total = total + w * subspace_cosines(torch.from_numpy(x), cs)[0].numpy()
        out[start:stop][valid] = total[valid]
    return out


def ranked(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row with a score, best first (ties: lower row first), as (rows, scores)."""
    return best_first(np.arange(len(scores)), scores)


def main(argv=None) -> None:
    """Select with both rules on each multi-sub-task target, fine-tune, print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cached_run_args(ap)
    ap.add_argument(
        "--no-finetune",
        dest="finetune",
        action="store_false",
        help="only the selections and their sub-task counts (quality.py fine-tunes gist and gist-rr itself)",
    )
    ap.add_argument("--out", help="JSON output (default benchmarks/results/quality_subtasks[-holdout].json)")
    args = ap.parse_args(argv)
    run = cached_run(args)
    spec, base, tok, pool, store = run.spec, run.base, run.tok, run.pool, run.store
    out_file = args.out or os.path.join(
        HERE, "results", "quality_subtasks" + ("-holdout" if args.holdout_tasks else "") + ".json"
    )
    row_of = {e.id: i for i, e in enumerate(pool)}
    targets = [t for t in run.targets if len(set(t.subtasks)) > 1]
    n = spec.n_select(len(pool))
    t0 = time.time()
    res: dict = {"n_select": n, "seeds": list(spec.seeds), "warmup_epochs": spec.warmup_epochs, "targets": {}}
    print(f"{'target':<26} {'rule':<12} {'loss':>16}  sub-tasks won (min-max)  top pool tasks")
    for t in targets:
        sel = gi.select(store, [t.val_file], None, SelectConfig(method="gist", top=n), progress=False)
        scores = subtask_scores(store, sel.target)
        picks = {  # the package's merge rules, applied to the scores computed here
            "max": ranked(scores.max(axis=1))[0][:n],
            "round-robin": round_robin([ranked(scores[:, j]) for j in range(scores.shape[1])], n)[0],
        }
        rr = gi.select(store, [t.val_file], None, SelectConfig(top=n, subtasks="round-robin"), progress=False)
        same = {
            "max": set(picks["max"].tolist()) == {row_of[i] for i in sel.ids},
            "round-robin": picks["round-robin"].tolist() == [row_of[i] for i in rr.ids],
        }
        entry = res["targets"].setdefault(t.name, {"subtasks": sel.target.subtasks, "package_agrees": same})
        for rule, rows in picks.items():
            won = np.bincount(scores[rows].argmax(axis=1), minlength=scores.shape[1])
            tasks = [task_of(pool[int(r)]) for r in rows]
            share = sorted(((tasks.count(k) / len(tasks), k) for k in set(tasks)), reverse=True)[:3]
            losses = [
                evaluate(finetune(base, tok, [pool[int(r)] for r in rows], spec, s), tok, t, spec)["loss"]
                for s in (spec.seeds if args.finetune else ())
            ]
            entry[rule] = {
                "loss": summarise(losses) if losses else None,
                "subtask_won": won.tolist(),
                "top_tasks": [[k, round(v, 3)] for v, k in share],
            }
            ls = entry[rule]["loss"]
            shown = f"{ls['mean']:>8.3f} ± {ls['std']:.3f}" if ls else f"{'(no fine-tuning)':>16}"
            print(
                f"{t.name:<26} {rule:<12} {shown}  {won.min():>3}-{won.max():<3} "
                + ", ".join(f"{k} {v:.0%}" for v, k in share)
                + f"  (= select --subtasks {rule}: {same[rule]})",
                flush=True,
            )
    res["seconds"] = round(time.time() - t0, 1)
    with open(out_file, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"wrote {out_file} in {res['seconds']:.0f} s")
    rules = ("max", "round-robin")
    print(
        json.dumps(
            {
                t: {r: round(v[r]["loss"]["mean"], 4) if v[r]["loss"] else None for r in rules}
                for t, v in res["targets"].items()
            }
        )
    )


if __name__ == "__main__":
    main()
