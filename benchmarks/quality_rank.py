"""Rank choice, ablated: GIST's selection and target loss at several energy thresholds of the automatic rank.

Reuses what a finished ``benchmarks/quality.py`` run left in its cache (base model, pool subsample, warmup, the
sgd store); run that first. For each energy threshold and target it selects 5% with ``--method gist`` (projected)
and fine-tunes the base on it with quality.py's settings and seeds, so the losses compare with quality.py's
table (energy 0.9 is the package default and quality.py's ``gist`` column).

Reproduce::

    python benchmarks/quality.py                  # once (caches everything)
    python benchmarks/quality_rank.py             # energies 0.8 0.95 0.99, about 5 min each on 2 cores

Writes benchmarks/results/quality_rank.json; the last printed line is one JSON object of mean losses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gist_index as gi  # noqa: E402
from benchmarks.qualitylib.cached import add_cached_run_args, cached_run  # noqa: E402
from benchmarks.qualitylib.methods import evaluate, finetune  # noqa: E402
from benchmarks.qualitylib.report import summarise  # noqa: E402
from benchmarks.qualitylib.settings import HERE, task_of  # noqa: E402
from gist_index.config import SelectConfig  # noqa: E402


def main(argv=None) -> None:
    """Select and fine-tune at each energy threshold; print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cached_run_args(ap)
    ap.add_argument("--energies", type=float, nargs="+", default=[0.8, 0.95, 0.99])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quality_rank.json"))
    args = ap.parse_args(argv)
    run = cached_run(args)
    spec, base, tok, pool, store, targets = run.spec, run.base, run.tok, run.pool, run.store, run.targets
    row_of = {e.id: i for i, e in enumerate(pool)}
    n = spec.n_select(len(pool))
    t0 = time.time()
    out: dict = {"n_select": n, "seeds": list(spec.seeds), "targets": {}}
    print(f"{'target':<16} {'energy':>6} {'k':>8} {'loss':>16} {'own task':>8}")
    for t in targets:
        res = out["targets"].setdefault(t.name, {})
        for e in args.energies:
            sel = gi.select(store, [t.val_file], None, SelectConfig(method="gist", top=n, energy=e), progress=False)
            rows = np.asarray([row_of[i] for i in sel.ids])
            losses = [
                evaluate(finetune(base, tok, [pool[int(r)] for r in rows], spec, s), tok, t, spec)["loss"]
                for s in spec.seeds
            ]
            tasks = [task_of(pool[int(r)]) for r in rows]
            share = {k: tasks.count(k) / len(tasks) for k in set(tasks)}
            top = max(share, key=share.get)
            res[str(e)] = {"rank": sel.target.ranks, "loss": summarise(losses), "top_task": [top, share[top]]}
            ls = res[str(e)]["loss"]
            print(
                f"{t.name:<16} {e:>6} {str(sel.target.ranks):>8} {ls['mean']:>8.3f} ± {ls['std']:.3f} "
                f"{top} {share[top]:.0%}",
                flush=True,
            )
    out["seconds"] = round(time.time() - t0, 1)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {args.out} in {out['seconds']:.0f} s")
    print(json.dumps({t: {e: round(v["loss"]["mean"], 4) for e, v in r.items()} for t, r in out["targets"].items()}))


if __name__ == "__main__":
    main()
