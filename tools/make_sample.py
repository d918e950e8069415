"""Regenerate the small real-data sample bundled with the package (gist_index/sample/) from ../shared/data.

    python tools/make_sample.py [--data ../shared/data] [--per-task 40] [--max-chars 1200]

The sample is stratified: up to --per-task short examples from each pool task (T0's datasets and GSM8K), in a
fixed seeded order, plus each target's validation file unchanged. Its README records where it came from.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "gist_index", "sample")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--per-task", type=int, default=40)
    ap.add_argument("--max-chars", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    by_task = defaultdict(list)
    for name in ("t0.jsonl.gz", "gsm8k_train.jsonl.gz"):
        with gzip.open(os.path.join(args.data, "pool", name), "rt", encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                if sum(len(m["content"]) for m in rec["messages"]) <= args.max_chars:
                    by_task[rec["task"]].append(rec)
    rng = random.Random(args.seed)
    pool = []
    for task in sorted(by_task):
        recs = by_task[task]
        pool.extend(rng.sample(recs, min(args.per_task, len(recs))))
    rng.shuffle(pool)
    os.makedirs(OUT, exist_ok=True)
    text = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in pool).encode("utf-8")
    with open(os.path.join(OUT, "pool.jsonl.gz"), "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        fh.write(text)
    for target in sorted(os.listdir(os.path.join(args.data, "targets"))):
        shutil.copyfile(
            os.path.join(args.data, "targets", target, "val.jsonl.gz"), os.path.join(OUT, f"{target}_val.jsonl.gz")
        )
    print(f"{len(pool)} pool examples from {len(by_task)} tasks -> {OUT}")


if __name__ == "__main__":
    main()
