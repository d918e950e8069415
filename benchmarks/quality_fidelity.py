"""Fidelity per byte: how much of exact GIST's top 5% a store keeps, by projected dimension and stored type.

A store's bytes per example are ``d x bytes per coordinate x checkpoints``. float16 (the default) spends two
bytes a coordinate, int8 one (each row scaled so that its largest coordinate is +-127; every score uses only a
row's direction). At the same bytes, int8 can hold twice the dimension, and the projection's noise falls as
1/sqrt(d) while int8's rounding adds about 1% of a coordinate. This script measures the trade on a finished
``benchmarks/quality.py`` run (its cache: base model, warmup checkpoints, pool subsample, targets): the pool's raw
gradients are streamed once; each target's top 5% by the paper's formula on raw gradients is compared with the
top 5% from CountSketch projections at each d, with the pool rows stored as each type (float32: no rounding).

Reproduce::

    python benchmarks/quality.py [options]                     # once (caches everything)
    python benchmarks/quality_fidelity.py [the same options]   # about 3-6 min on 2 cores

Writes benchmarks/results/quality_fidelity[-NAME].json; the last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.quality import HERE, add_cached_run_args, cached_run, streamed_scores, top_rows  # noqa: E402

BYTES = {"float32": 4, "float16": 2, "int8": 1}


def main(argv=None) -> None:
    """Stream the raw gradients once, score every (d, type), print the overlap table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cached_run_args(ap)
    ap.add_argument("--dims", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="projected dimensions")
    ap.add_argument("--dtypes", nargs="+", default=["float16", "int8"], choices=sorted(BYTES), help="stored types")
    ap.add_argument("--out", help="JSON output (default benchmarks/results/quality_fidelity[-holdout].json)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    run = cached_run(args)
    spec, pool, targets = run.spec, run.pool, run.targets
    variants = {f"{d}/{dt}": (d, dt) for d in args.dims for dt in args.dtypes}
    t0 = time.time()
    _, _, acc = streamed_scores(run.base, run.ckpts, pool, targets, run.weights, spec, variants, args.progress)
    n = spec.n_select(len(pool))
    res: dict = {"n_pool": len(pool), "n_select": n, "n_checkpoints": len(run.ckpts), "targets": {}, "mean": {}}
    for t in targets:
        a = acc[t.name]
        exact = {v: set(top_rows(a[v, "exact"].max(1), n).tolist()) for v in ("gist", "gist-full")}
        res["targets"][t.name] = {
            key: {v: len(set(top_rows(a[v, key].max(1), n).tolist()) & exact[v]) / n for v in exact} for key in variants
        }
    print(f"{'d':>6} {'type':<8} {'bytes/example':>13} {'gist':>6} {'gist-full':>9}   per target (gist)")
    for key, (d, dt) in variants.items():
        per = [res["targets"][t.name][key] for t in targets]
        mean = {v: float(np.mean([p[v] for p in per])) for v in ("gist", "gist-full")}
        res["mean"][key] = {"d": d, "dtype": dt, "bytes_per_example": d * BYTES[dt] * len(run.ckpts), **mean}
        print(
            f"{d:>6} {dt:<8} {d * BYTES[dt] * len(run.ckpts):>13,} {mean['gist']:>6.3f} {mean['gist-full']:>9.3f}   "
            + " ".join(f"{p['gist']:.3f}" for p in per)
        )
    res["seconds"] = round(time.time() - t0, 1)
    out = args.out or os.path.join(
        HERE, "results", "quality_fidelity" + ("-holdout" if args.holdout_tasks else "") + ".json"
    )
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"wrote {out} in {res['seconds']:.0f} s (targets: {', '.join(t.name for t in targets)})")
    print(json.dumps({k: round(v["gist"], 4) for k, v in res["mean"].items()}))


if __name__ == "__main__":
    main()
