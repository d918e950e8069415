"""Cold exact scan with and without the store's readahead (posix_fadvise WILLNEED), interleaved in one run.

Uses a synthetic store of benchmarks/query.py (made here if missing) and its targets (9 and 57 sub-tasks). Each
round drops the store from the page cache, measures the read floor (plain large reads of the vector files), then
scans cold once with readahead and once without (the order alternates between rounds).

Reproduce (the 1e6 store takes 2 GB of disk and about a minute to make)::

    PYTHONPATH=. python benchmarks/readahead.py                 # N = 1e6, d = 1024, 3 rounds
    PYTHONPATH=. python benchmarks/readahead.py --rows 100000   # smaller

Writes benchmarks/results/readahead.json; the last printed line is one JSON object with the median cold ratio
(exact / floor) with and without readahead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from benchmarks.query import Generator, evict, make_store, make_target, plain_read, store_files, vector_files
from gist_index.select import scan_top
from gist_index.store import GradientStore
from gist_index.subspace import Scorer, build_target

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> None:
    """Run the interleaved comparison and print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--cache", default=os.path.join(HERE, "results", "cache"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "readahead.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = os.path.join(args.cache, f"syn-n{args.rows}-d{args.dim}-c1-s0.gist")  # query.py's name and seed
    gen = Generator(args.dim, 1, seed=0)
    store = make_store(path, args.rows, gen, 1024)  # reused when it exists
    files, vfiles = store_files(store), vector_files(store)
    with_readahead = GradientStore._will_need
    n = int(round(0.05 * store.n_rows))
    results = {"rows": store.n_rows, "dim": store.dim, "threads": args.threads, "targets": {}}
    print(f"{'S':>3} {'round':>5} {'readahead':>9} {'floor s':>8} {'exact s':>8} {'ratio':>6}")
    for s in (9, 57):
        vecs, labels = make_target(gen, s, seed=1000 + s)  # query.py's targets
        scorer = Scorer(build_target(vecs, labels, [1.0]), "gist")
        runs = []
        for r in range(args.rounds):
            evict(files)
            floor, _ = plain_read(vfiles)
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                GradientStore._will_need = with_readahead if mode == "on" else (lambda self, i: None)
                evict(files)
                t = time.perf_counter()
                scan_top(store, scorer, n, progress=False)
                t = time.perf_counter() - t
                runs.append({"round": r, "readahead": mode, "floor_s": floor, "exact_s": t, "ratio": t / floor})
                print(f"{s:>3} {r:>5} {mode:>9} {floor:>8.2f} {t:>8.2f} {t / floor:>6.2f}", flush=True)
        GradientStore._will_need = with_readahead
        results["targets"][str(s)] = {
            "runs": runs,
            **{
                f"median_ratio_{m}": statistics.median(x["ratio"] for x in runs if x["readahead"] == m)
                for m in ("on", "off")
            },
        }
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {args.out}")
    print(
        json.dumps(
            {
                "benchmark": "readahead",
                "rows": store.n_rows,
                **{
                    f"S{s}": {m: round(v[f"median_ratio_{m}"], 3) for m in ("on", "off")}
                    for s, v in results["targets"].items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
