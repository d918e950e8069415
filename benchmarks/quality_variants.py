"""Which ingredient makes LESS win: score formula and gradient store, crossed, on a finished quality.py run.

LESS and GIST differ in two things: the gradients of the pool (LESS: Adam-preconditioned, the ``adam`` store;
GIST: plain, the ``sgd`` store) and the score (LESS: cosine with each validation gradient over the whole
projected gradient, mean per sub-task, max; GIST: cosine inside the top-k subspace of the validation gradients
with each sub-task's mean direction, max). quality.py measures the two diagonal cells (``less`` on adam,
``gist`` on sgd); this script fills in the other two, or any of these variants, on the cached run (base model,
pool subsample, both stores), fine-tuning with quality.py's settings and seeds so the losses compare with its
table:

* ``gist-adam``: the paper's formula on the adam store (the subspace still comes from the plain validation
  gradients, as LESS's validation side);
* ``gist-full-adam``: GIST's sub-task directions, scored over the whole gradient's norm, on the adam store;
* ``less-sgd``: LESS's formula on the sgd store;
* ``gist-rms``: the paper's formula on an ``rms`` store (built here once, as quality.py builds its stores):
  LESS's preconditioning without its momentum term ``0.9 m``, a vector every example shares (in the adam store
  it dominates: each example's preconditioned gradient is mostly that one direction);
* ``gist-kall``, ``gist-adam-kall``: the paper's formula on the sgd or adam store with the subspace spanning every
  validation gradient (``--energy 1``, select's default since the third ``--unseen`` draw: k = every numerically
  non-zero direction, 6-9 here, where energy 0.9, the default before, kept 3-7). The official GIST scripts fix k
  (``--target_dim``, 9 for TydiQA's 9 validation examples, 50 or 150 elsewhere), capped by the number of
  validation examples, so with a handful of them they keep all;
* ``gist-lora``: the paper's formula (every validation direction) on a store of ``build --gradient lora``: each
  pool gradient preconditioned by LoRA's own r x r metric (A's times ``(B^T B)^-1``, B's times ``(A A^T)^-1``,
  slightly damped), the step of scaled gradient descent on the factors; validation gradients plain;
* ``gist-unitval``: the paper's formula (every validation direction) on the sgd store, with every validation
  gradient scaled to unit norm before the SVD and the sub-task means (``select --unit-val``);
* ``gist-adam-unitval``: the same on the adam store: select's defaults (every direction, unit validation
  gradients) on LESS's gradients; ``gist-full-adam-unitval`` scores its sub-task directions over the whole
  gradient's norm instead of inside the subspace: with one sub-task, every direction and unit validation
  gradients that is LESS's score divided by the norm of the mean validation direction at each checkpoint, so it
  isolates what the paper's in-subspace cosine changes;
* ``gist-pca``: the paper's formula on an sgd store built with ``--projection pca`` (the package's default
  projection, and quality.py's since 2026-12-06, where it is the run's own sgd store; the earlier runs' stores are
  CountSketch): closer to exact GIST at the same d. For the variants that use the
  paper's formula on the sgd gradients (``gist``, ``gist-pca``) the JSON also holds the selection's overlap with
  exact GIST's top 5% (``overlap_exact``, from quality.py's fidelity cache of the run).

Reproduce::

    python benchmarks/quality.py --no-default-targets --holdout-tasks T ... --unseen --out DIR   # once
    python benchmarks/quality_variants.py --no-default-targets --holdout-tasks T ... --unseen \\
        --variants gist-adam less-sgd --out DIR/quality_variants.json

It also measures, on 64 pool examples per warmup checkpoint, how the raw gradient splits between the LoRA A and
B matrices in each store's gradients (``geometry`` in the JSON): with plain gradients B takes almost all of the
squared norm (A's gradient carries B's small warmed-up weights), while Adam, which fine-tuning uses, moves both.

Every selection's overlap with LESS's (``overlap_less``: LESS on the run's adam store, as quality.py selects it) is
recorded; ``--selection-only`` stops there (no fine-tuning, no geometry: a minute).

Writes the JSON given by ``--out``; the last printed line is one JSON object of mean losses (of overlaps with
``--selection-only``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gist_index as gi  # noqa: E402
from benchmarks.qualitylib.cached import add_cached_run_args, cached_run  # noqa: E402
from benchmarks.qualitylib.fidelity import fidelity_cache_prefix  # noqa: E402
from benchmarks.qualitylib.methods import evaluate, finetune  # noqa: E402
from benchmarks.qualitylib.report import summarise  # noqa: E402
from benchmarks.qualitylib.settings import HERE, task_of  # noqa: E402
from benchmarks.qualitylib.targets import pool_store  # noqa: E402
from gist_index.config import SelectConfig  # noqa: E402
from gist_index.data import encode  # noqa: E402
from gist_index.extract import CheckpointedModel  # noqa: E402
from gist_index.project import IdentityProjector  # noqa: E402

# name -> (select --method, store, select --energy[, other SelectConfig fields]); the two quality.py already
# measures are listed for completeness, with the energy of the committed runs (0.9, select's default until the
# third --unseen draw; since then 1.0, the "-kall" variants)
VARIANTS = {
    "gist-adam": ("gist", "adam", 0.9),
    "gist-full-adam": ("gist-full", "adam", 0.9),
    "gist-kall": ("gist", "sgd", 1.0),
    "gist-adam-kall": ("gist", "adam", 1.0),
    "less-sgd": ("less", "sgd", 0.9),
    "gist-rms": ("gist", "rms", 0.9),
    "gist-pca": ("gist", "sgd-pca", 0.9),
    "gist-lora": ("gist", "lora", 1.0),
    "gist-unitval": ("gist", "sgd", 1.0, {"unit_val": True}),
    "gist-adam-unitval": ("gist", "adam", 1.0, {"unit_val": True}),
    "gist-full-adam-unitval": ("gist-full", "adam", 1.0, {"unit_val": True}),
    "gist": ("gist", "sgd", 0.9),
    "less": ("less", "adam", 0.9),
}


def options(variant: tuple) -> dict:
    """A variant's SelectConfig fields besides method and energy: every variant was measured with the paper's
    formula as written (``unit_val`` False, select's default until the third draw's rerun) unless it says."""
    return {"unit_val": False, **(variant[3] if len(variant) > 3 else {})}


GEOMETRY_STORES = ("sgd", "adam", "rms", "lora")


def geometry(run, n: int = 64, seed: int = 0) -> list[dict]:
    """Per warmup checkpoint, on ``n`` random pool examples' raw gradients (sgd, adam, rms, lora): the mean share of the
    squared norm in the LoRA A matrices, the mean pairwise cosine, and (adam) the mean cosine with the update
    direction all examples share, Adam's momentum term ``m / sqrt(v)``."""
    cm = CheckpointedModel(run.base, run.ckpts, "cpu")
    rows = np.random.default_rng(seed).choice(len(run.pool), min(n, len(run.pool)), replace=False)
    enc = [encode(run.pool[int(i)], cm.tokenizer, run.spec.max_length) for i in rows]
    proj = IdentityProjector(cm.source_dim)
    in_a = np.concatenate([np.full(p.numel, "lora_A" in p.name) for p in cm.params])
    off = ~np.eye(len(enc), dtype=bool)
    out = []
    for c in range(len(run.ckpts)):
        rec: dict = {"checkpoint": c}
        unit = {}
        for grad in GEOMETRY_STORES:
            g = cm.gradients(enc, c, proj, grad)["vectors"].astype(np.float64)
            sq = g**2
            unit[grad] = g / np.linalg.norm(g, axis=1, keepdims=True)
            rec[grad] = {
                "share_in_lora_A": round(float((sq[:, in_a].sum(1) / sq.sum(1)).mean()), 4),
                "mean_pairwise_cosine": round(float((unit[grad] @ unit[grad].T)[off].mean()), 4),
            }
        m, v = (np.concatenate([a[i].flatten().numpy() for a in cm.adam_state(c)]).astype(np.float64) for i in (0, 1))
        shared = m / np.sqrt(v + 1e-8)
        cos_shared = (unit["adam"] @ shared).mean() / np.linalg.norm(shared)
        rec["adam"]["mean_cosine_with_momentum_term"] = round(float(cos_shared), 4)
        out.append(rec)
    return out


def table(results: dict, variants_out: dict, variants: list[str]) -> list[str]:
    """A markdown table of target loss (mean ± std): the run's random, less and gist, then the variants."""
    cols = ["random", "less", "gist"] + [v for v in variants if v not in ("less", "gist")]
    lines = ["| target | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, t in variants_out["targets"].items():
        cells = []
        for c in cols:
            ls = t[c]["loss"] if c in t else results["targets"][name]["methods"][c]["loss"]
            cells.append(f"{ls['mean']:.3f} ± {ls['std']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    """Select with each variant on each target of the cached run, fine-tune, print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cached_run_args(ap)
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["gist-adam", "less-sgd"])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quality_variants.json"))
    ap.add_argument("--results", help="the run's quality.json: also print a table with its random, less and gist")
    ap.add_argument(
        "--selection-only", action="store_true", help="select and compare with LESS's selection; no fine-tuning"
    )
    args = ap.parse_args(argv)
    run = cached_run(args)
    spec, base, tok, pool = run.spec, run.base, run.tok, run.pool
    row_of = {e.id: i for i, e in enumerate(pool)}
    n = spec.n_select(len(pool))
    t0 = time.time()
    out: dict = {"n_select": n, "seeds": list(spec.seeds), "work": run.work, "targets": {}}
    out["geometry"] = [] if args.selection_only else geometry(run)
    for g in out["geometry"]:
        print(
            f"checkpoint {g['checkpoint']}: share of the squared gradient in LoRA A: "
            + ", ".join(f"{k} {g[k]['share_in_lora_A']:.3f}" for k in GEOMETRY_STORES)
            + "; mean pairwise cosine: "
            + ", ".join(f"{k} {g[k]['mean_pairwise_cosine']:.3f}" for k in GEOMETRY_STORES)
            + "; adam vs its "
            f"momentum term: {g['adam']['mean_cosine_with_momentum_term']:.3f}"
        )
    exact_top: dict = {}  # (energy, unit_val) -> target -> exact GIST's top rows, from the run's fidelity caches
    for energy, unit in {(v[2], options(v)["unit_val"]) for v in VARIANTS.values()}:
        for f in glob.glob(os.path.join(run.work, fidelity_cache_prefix(energy, unit) + "*.json")):
            with open(f) as fh:
                top = {k: set(v["top_exact"]) for k, v in json.load(fh).items()}
            exact_top.setdefault((energy, unit), {}).update(top)
    if not args.selection_only:
        print(f"{'target':<42} {'variant':<15} {'loss':>16}  top pool tasks")
    adam_store, _ = pool_store(base, run.ckpts, run.work, "adam", spec, True)
    for t in run.targets:
        res = out["targets"].setdefault(t.name, {})
        less = set(gi.select(adam_store, [t.val_file], None, SelectConfig(method="less", top=n), progress=False).ids)
        for name in args.variants:
            method, grad, energy, *_ = VARIANTS[name]
            opts = options(VARIANTS[name])
            gradient, _, projection = grad.partition("-")
            store, _ = pool_store(base, run.ckpts, run.work, gradient, spec, True, projection or None)
            cfg = SelectConfig(method=method, top=n, energy=energy, **opts)
            sel = gi.select(store, [t.val_file], None, cfg, progress=False)
            rows = np.asarray([row_of[i] for i in sel.ids])
            overlap_less = len(set(sel.ids) & less) / n
            entry = {
                "method": method,
                "store": grad,
                "options": opts,
                "overlap_less": overlap_less,
                "ids": list(sel.ids),
            }
            if args.selection_only:
                res[name] = entry
                print(f"{t.name:<42} {name:<22} overlap with LESS {overlap_less:.3f}", flush=True)
                continue
            losses = [
                evaluate(finetune(base, tok, [pool[int(r)] for r in rows], spec, s), tok, t, spec)["loss"]
                for s in spec.seeds
            ]
            tasks = [task_of(pool[int(r)]) for r in rows]
            share = sorted(((tasks.count(k) / len(tasks), k) for k in set(tasks)), reverse=True)[:3]
            res[name] = {
                **entry,
                "rank": sel.target.ranks,
                "loss": summarise(losses),
                "top_tasks": [[k, round(v, 3)] for v, k in share],
            }
            top = exact_top.get((energy, opts["unit_val"]), {})
            if method == "gist" and grad.startswith("sgd") and t.name in top:
                res[name]["overlap_exact"] = len(set(rows.tolist()) & top[t.name]) / n
            ls = res[name]["loss"]
            ov = f"  (overlap with exact GIST {res[name]['overlap_exact']:.3f})" if "overlap_exact" in res[name] else ""
            print(
                f"{t.name:<42} {name:<15} {ls['mean']:>8.3f} ± {ls['std']:.3f}  "
                + ", ".join(f"{k} {v:.0%}" for v, k in share)
                + ov,
                flush=True,
            )
    out["seconds"] = round(time.time() - t0, 1)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {args.out} in {out['seconds']:.0f} s")
    if args.selection_only:
        print(json.dumps({t: {v: r["overlap_less"] for v, r in res.items()} for t, res in out["targets"].items()}))
        return
    if args.results:
        with open(args.results) as fh:
            print("\n".join(table(json.load(fh), out, args.variants)))
    means = {t: {v: round(r["loss"]["mean"], 4) for v, r in res.items()} for t, res in out["targets"].items()}
    print(json.dumps(means))


if __name__ == "__main__":
    main()
