"""Take a seeded random sample of JSON Lines files (gzipped or not) into one file, keeping each line unchanged.

    python tools/sample_jsonl.py ../shared/data/pool/*.jsonl.gz --n 5000 --seed 0 --out runs/pool5k.jsonl.gz

Lines are chosen uniformly over all input lines (two streaming passes, memory for the chosen line numbers only)
and written in input order.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random


def _open(path: str, mode: str):
    return gzip.open(path, mode + "t", encoding="utf-8") if path.endswith(".gz") else open(path, mode, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--n", type=int, required=True, help="lines to keep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output file (.jsonl or .jsonl.gz)")
    args = ap.parse_args()
    total = 0
    for f in args.files:
        with _open(f, "r") as fh:
            total += sum(1 for line in fh if line.strip())
    keep = set(random.Random(args.seed).sample(range(total), min(args.n, total)))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    row = 0
    with _open(args.out, "w") as out:
        for f in args.files:
            with _open(f, "r") as fh:
                for line in fh:
                    if line.strip():
                        if row in keep:
                            out.write(line if line.endswith("\n") else line + "\n")
                        row += 1
    print(f"{len(keep)} of {total} lines -> {args.out}")


if __name__ == "__main__":
    main()
