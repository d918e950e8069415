"""Fidelity per byte: how much of exact GIST's top 5% a store keeps, by projected dimension and stored type.

A store's bytes per example are ``d x bytes per coordinate x checkpoints``. float16 spends two bytes a
coordinate, int8 (the default) one (each row scaled so that its largest coordinate is +-127; every score uses
only a row's direction). At the same bytes, int8 can hold twice the dimension, and the projection's noise falls as
1/sqrt(d) while int8's rounding adds about 1% of a coordinate. This script measures the trade on a finished
``benchmarks/quality.py`` run (its cache: base model, warmup checkpoints, pool subsample, targets): the pool's raw
gradients are streamed once; each target's top 5% by the paper's formula on raw gradients is compared with the
top 5% from CountSketch projections at each d, with the pool rows stored as each type (float32: no rounding).

With ``--projections countsketch pca`` it also measures ``build --projection pca`` at each d: the basis fitted
(``gist_index.project.fit_basis``) to the raw gradients of the rows ``build`` samples (``--pca-sample``, default
1000: a quarter of the 4000-row subsample, as build's default), rank ``--pca-rank`` (0: d/4, build's default),
capped by the sample's rank. The rows of the sample lie in the basis, so besides the overlap over the whole pool
the script reports it over the rows outside the sample (``held_out``: the top 5% of those rows, exact against
projected), which is what a pool much larger than the sample sees.

Exact GIST and every simulated store score with ``select``'s rule for the validation gradients (``--unit-val``,
its default; ``--no-unit-val``: the formula as written), and the run's own sgd store is also selected from by
``gist_index.select`` with the same rank and rule (``store``: fidelity end to end, what a user gets).

Reproduce::

    python benchmarks/quality.py [options]                     # once (caches everything)
    python benchmarks/quality_fidelity.py [the same options]   # about 3-6 min on 2 cores
    python benchmarks/quality_fidelity.py [the same options] --dims 8192 --dtypes float16 int8 \
        --projections countsketch pca --out DIR/quality_fidelity-pca.json     # the pca projection (5-8 min)

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

import gist_index as gi  # noqa: E402
from benchmarks.qualitylib.cached import add_cached_run_args, cached_run  # noqa: E402
from benchmarks.qualitylib.fidelity import UNIT_VAL, pca_projectors, streamed_scores  # noqa: E402
from benchmarks.qualitylib.methods import top_rows  # noqa: E402
from benchmarks.qualitylib.settings import HERE  # noqa: E402
from gist_index.build import pca_sample_rows  # noqa: E402
from gist_index.config import DEFAULT_ENERGY, BuildConfig, SelectConfig  # noqa: E402

BYTES = {"float32": 4, "float16": 2, "int8": 1}


def main(argv=None) -> None:
    """Stream the raw gradients once, score every (d, type), print the overlap table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cached_run_args(ap)
    ap.add_argument("--dims", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="projected dimensions")
    ap.add_argument("--dtypes", nargs="+", default=["float16", "int8"], choices=sorted(BYTES), help="stored types")
    ap.add_argument("--projections", nargs="+", default=["countsketch"], choices=["countsketch", "pca"])
    ap.add_argument("--pca-sample", type=int, default=1000, help="pca: pool rows the basis is fitted to")
    ap.add_argument("--pca-rank", type=int, default=0, help="pca: basis rank (0: d/4, capped by the sample)")
    ap.add_argument(
        "--energy", type=float, default=DEFAULT_ENERGY, help="the subspace's share of energy (select --energy)"
    )
    ap.add_argument(
        "--unit-val",
        action=argparse.BooleanOptionalAction,
        default=UNIT_VAL,
        help="unit validation gradients before the SVD and the means (select --unit-val, its default)",
    )
    ap.add_argument("--out", help="JSON output (default benchmarks/results/quality_fidelity[-holdout].json)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    run = cached_run(args)
    spec, pool, targets = run.spec, run.pool, run.targets
    t0 = time.time()
    variants = {}
    if "countsketch" in args.projections:
        variants.update({f"{d}/{dt}": (d, dt) for d in args.dims for dt in args.dtypes})
    sample = pca_sample_rows(len(pool), args.pca_sample, BuildConfig().seed)
    res: dict = {
        "n_pool": len(pool),
        "n_checkpoints": len(run.ckpts),
        "energy": args.energy,
        "unit_val": args.unit_val,
        "targets": {},
        "mean": {},
    }
    if "pca" in args.projections:
        variants.update(pca_variants(run, sample, args))
        res["pca"] = {"sample": len(sample), "seconds": round(time.time() - t0, 1)}
    _, _, acc = streamed_scores(
        run.base,
        run.ckpts,
        pool,
        targets,
        run.weights,
        spec,
        variants,
        args.progress,
        energy=args.energy,
        unit_val=args.unit_val,
    )
    n = spec.n_select(len(pool))
    held = np.setdiff1d(np.arange(len(pool)), sample)  # rows outside a pca sample
    n_held = spec.n_select(len(held))
    res.update(n_select=n, n_held_out=len(held), n_select_held_out=n_held)

    def overlap(a, v, key, rows, k):
        top = lambda s: set(rows[top_rows(s[rows], k)].tolist())  # noqa: E731
        return len(top(a[v, key].max(1)) & top(a[v, "exact"].max(1))) / k

    everyone = np.arange(len(pool))
    row_of = {e.id: i for i, e in enumerate(pool)}
    for t in targets:
        a = acc[t.name]
        res["targets"][t.name] = {
            key: {
                **{v: overlap(a, v, key, everyone, n) for v in ("gist", "gist-full")},
                "gist_held_out": overlap(a, "gist", key, held, n_held),
            }
            for key in variants
        }
        # end to end: what select picks from the run's own sgd store, with the same rank and validation rule
        cfg = SelectConfig(method="gist", top=n, energy=args.energy, unit_val=args.unit_val)
        picked = {row_of[i] for i in gi.select(run.store, [t.val_file], None, cfg, progress=False).ids}
        res["targets"][t.name]["store"] = len(picked & set(top_rows(a["gist", "exact"].max(1), n).tolist())) / n
    print(f"{'variant':<18} {'bytes/example':>13} {'gist':>6} {'gist-full':>9} {'held-out':>8}   per target (gist)")
    for key, (d, dt, *proj) in variants.items():
        per = [res["targets"][t.name][key] for t in targets]
        mean = {v: float(np.mean([p[v] for p in per])) for v in ("gist", "gist-full", "gist_held_out")}
        kind = proj[0].kind if proj else "countsketch"
        res["mean"][key] = {
            "d": d,
            "dtype": dt,
            "projection": kind,
            "bytes_per_example": d * BYTES[dt] * len(run.ckpts),
        }
        res["mean"][key].update(mean)
        print(
            f"{key:<18} {d * BYTES[dt] * len(run.ckpts):>13,} {mean['gist']:>6.3f} {mean['gist-full']:>9.3f} "
            f"{mean['gist_held_out']:>8.3f}   " + " ".join(f"{p['gist']:.3f}" for p in per)
        )
    res["seconds"] = round(time.time() - t0, 1)
    out = args.out or os.path.join(
        HERE, "results", "quality_fidelity" + ("-holdout" if args.holdout_tasks else "") + ".json"
    )
    store = [res["targets"][t.name]["store"] for t in targets]
    res["store"] = {"store": run.store, "mean": float(np.mean(store))}
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"the run's store, selected by select: {res['store']['mean']:.3f}   " + " ".join(f"{x:.3f}" for x in store))
    print(f"wrote {out} in {res['seconds']:.0f} s (targets: {', '.join(t.name for t in targets)})")
    print(json.dumps({k: [round(v["gist"], 4), round(v["gist_held_out"], 4)] for k, v in res["mean"].items()}))


def pca_variants(run, sample: np.ndarray, args) -> dict:
    """``pca-D/TYPE`` -> (d, type, PcaProjector): one basis per d, fitted as ``build --projection pca`` fits it (the
    unit-normalised gradients of the sampled rows at every checkpoint, through the first stage; here every sampled
    row, none held out), of rank ``--pca-rank`` (0: build's default)."""
    fitted = pca_projectors(
        run.base, run.ckpts, run.pool, sample, args.dims, run.spec, hold_out=False, rank=args.pca_rank
    )
    for d, p in fitted.items():
        print(f"pca d={d}: basis rank {p.rank} from {len(sample)} rows x {len(run.ckpts)} checkpoints", flush=True)
    return {f"pca-{d}/{dt}": (d, dt, p) for d, p in fitted.items() for dt in args.dtypes}


if __name__ == "__main__":
    main()
