"""Selection quality: does fine-tuning on GIST's selection lower the target test loss more than the alternatives?

Usage (the defaults are the documented run; see benchmarks/README.md, "## quality.py")::

    nice -n 10 python benchmarks/quality.py                     # the three targets in ../shared/data/targets
    python benchmarks/quality.py --targets DIR [DIR ...]        # and more: each DIR holds val.jsonl(.gz), test...
    python benchmarks/quality.py --base-only                    # just pretrain (and cache) the base model
    python benchmarks/quality.py --stores-only                  # and warm up and build the stores, no more

Base model (cached, pretrained once): byte-level BPE tokenizer and a small Llama trained from scratch on the pool's
text. The pool is split in two by a hash of each example's id: the *pretraining half* trains the tokenizer and the
base; the benchmark's pool subsample is drawn from the other half, so no candidate was seen in pretraining.
With ``--holdout-tasks T ... --unseen`` the base is pretrained without those tasks at all (its own cache), so a
held-out target is new to the base model as a task, as the paper's targets are to theirs.

A run (timed; only the base model is cached):

1. pool: one fixed random subsample of ``--pool-size`` examples of the selection half that fit ``--max-length``
   tokens (the same for every method; stated in the output);
2. LoRA warmup on a random 5% of it (``gist_index.warmup``); stores of its gradients at every checkpoint with
   ``gist_index.build``: ``sgd`` (GIST, MIPS) and ``adam`` (LESS), with build's defaults (d = 8192, the ``pca``
   projection, int8 vectors; ``--projection countsketch --store-dtype float16`` gives the stores of the runs
   before 2026-12-06);
3. per target, a 5% selection by each method: random; LESS; GIST (exact scan); GIST re-ranked on exact
   gradients (``--rerank``); GIST with sub-tasks taking turns (``--subtasks round-robin``); MIPS (GIST through the FAISS
   index); RDS (cosine of mean-pooled last-layer hidden states, mean per sub-task, max); BM25 (bm25s; one query
   per sub-task from its validation texts, max);
4. LoRA fine-tuning of the same base on each selection with identical settings and 3 seeds; target test loss
   (mean per-token loss on the responses of a fixed test subsample) and exact match by greedy decoding where
   answers are short;
5. fidelity: per target, the overlap of the top 5% chosen from projected gradients (d = 1024, 4096, 8192) with
   the top 5% of exact GIST on raw gradients, on the same checkpoints, with select's default rank. Raw gradients
   are streamed (never stored) and projected on the fly onto each target's exact subspace, which is the paper's
   formula; the projected scores use the run's projection at each d with the store's seed (pca: fitted at each d
   as build fits it) and the rows rounded as the store keeps them, and for a pca run a plain CountSketch at
   d = 8192 too; the store's own selection (``store``) is what a user gets;
6. outputs in ``--out``: quality.json, quality.md, PNG plots; the last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import gist_index as gi  # noqa: E402
from benchmarks.qualitylib.cached import add_store_args  # noqa: E402
from benchmarks.qualitylib.fidelity import FID_KEYS, fidelity, fidelity_cache_prefix, pca_projectors, streamed_scores  # noqa: E402
from benchmarks.qualitylib.methods import bm25_scores, evaluate, finetune, mean_hidden_states, per_subtask_max, top_rows  # noqa: E402
from benchmarks.qualitylib.report import METHODS, goals, markdown, plots, summarise  # noqa: E402
from benchmarks.qualitylib.settings import (  # noqa: E402
    DEFAULT_POOL,
    DEFAULT_TARGETS,
    MIN_TEST,
    BaseSpec,
    RunSpec,
    Timer,
    base_model,
    example_text,
    read_pool,
    task_of,
)
from benchmarks.qualitylib.targets import (  # noqa: E402
    base_spec_for,
    held_tasks,
    holdout_targets,
    load_target,
    pool_store,
    pool_subsample,
    unmeasurable,
)
from gist_index.build import pca_sample_rows  # noqa: E402
from gist_index.config import DEFAULT_ENERGY, BuildConfig, SelectConfig  # noqa: E402
from gist_index.data import read_examples  # noqa: E402
from gist_index.model import load_base_model, load_tokenizer  # noqa: E402
from gist_index.progress import bar as progress_bar  # noqa: E402

log = logging.getLogger("quality")


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
    if args.stores_only:
        return {"work": work, "stores": stores, "reused": reused, "seconds": dict(timer.stages)}
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
        energy = DEFAULT_ENERGY  # the rank rule of select's default, as the gist column uses it
        targets_key = hashlib.sha256(repr([t.val_file for t in targets]).encode()).hexdigest()[:8]
        fid_file = os.path.join(work, fidelity_cache_prefix(energy) + targets_key + ".json")
        if os.path.isfile(fid_file):
            with open(fid_file) as fh:
                fid = json.load(fh)
            for f in fid.values():
                f["top_exact"] = np.asarray(f["top_exact"])
                for key in FID_KEYS:
                    f[key] = {int(d): v for d, v in f[key].items()}
            reused.append("fidelity")
        else:
            if spec.projection == "pca":  # as build fits it at each d; the pool rows as the store keeps them
                sample = pca_sample_rows(len(pool), BuildConfig().pca_sample_for(len(pool)), BuildConfig().seed)
                pcas = pca_projectors(base, ckpts, pool, sample, spec.dims, spec)
                if spec.dim in pcas:  # the fit at the store's d mirrors build's: the largest principal angle
                    from gist_index.store import GradientStore

                    mine, built = pcas[spec.dim].basis_np, GradientStore.open(stores["sgd"]).pca_basis()
                    if mine.shape != built.shape:
                        raise SystemExit(f"pca basis {mine.shape} here against {built.shape} in {stores['sgd']}")
                    cos = np.linalg.svd(mine.T.astype(np.float64) @ built, compute_uv=False).min()
                    print(f"      pca fit at d={spec.dim} vs the store's basis: smallest principal cosine {cos:.6f}")
                variants = {d: (d, spec.store_dtype, pcas[d]) for d in spec.dims}
                variants["countsketch"] = (spec.dim, spec.store_dtype)
            else:  # the earlier runs: CountSketch, unrounded
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
        "--stores-only",
        action="store_true",
        help="stop after the warmup and the stores (the cache that quality_variants.py and quality_subtasks.py "
        "reuse); writes no results",
    )
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
    add_store_args(ap)
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
        projection=args.projection,
        store_dtype=args.store_dtype,
    )
    results = run(args, base, base_record, spec, base_spec)
    if args.stores_only:
        print(json.dumps(results))
        return
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
            "top5_overlap_store": round(results["fidelity"]["store_mean"], 4),
            **{f"d{d}": round(v, 4) for d, v in results["fidelity"]["mean_overlap"].items()},
        },
        "seconds": results["seconds"]["total"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
