"""One table over several ``benchmarks/quality.py`` runs: every target's losses, fidelity and selection focus, and
the goals counted over all of them.

Each run (the default targets, the held-out ones) writes its own ``quality.json``; this script reads any number of
them and prints markdown tables (the ones in benchmarks/README.md) and, last, one JSON object with the counts.
A method missing from a run (an older run without ``gist-rr``) shows as ``-``.

Reproduce::

    python benchmarks/quality_summary.py benchmarks/results/quality.json \\
        benchmarks/results/holdout-rerun/quality.json benchmarks/results/holdout2/quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.qualitylib.report import METHODS, goals, loss_table, task_focus  # noqa: E402


def load(paths: list[str]) -> list[tuple[str, str, dict, dict]]:
    """(label, target name, target results, its run's results) for every target of every run, in order; the
    label marks a target of a run whose base model never saw its tasks (``--unseen``)."""
    out = []
    for p in paths:
        with open(p) as fh:
            run = json.load(fh)
        run["goals"] = goals(run)
        unseen = " (unseen)" if run.get("base", {}).get("spec", {}).get("exclude") else ""
        out += [(name + unseen, name, t, run) for name, t in run["targets"].items()]
    return out


def tables(rows: list[tuple[str, str, dict, dict]]) -> tuple[str, dict]:
    """Markdown tables and the goal counts."""
    methods = [m for m in METHODS if any(m in t["methods"] for _, _, t, _ in rows)]
    lines = loss_table([(label, t) for label, _, t, _ in rows], methods)
    lines += ["", "| target | k | gist d=8192 | gist-full d=8192 | gist `--rerank 3` |", "|---|---|---|---|---|"]
    for label, name, _, run in rows:
        f, d = run["fidelity"]["targets"][name], str(run["fidelity"]["d"])
        lines.append(
            f"| {label} | {f['rank_exact'][0]} | {f['overlap'][d]:.3f} | {f['overlap_gist_full'][d]:.3f} | "
            f"{f['store_overlap_rerank']:.3f} |"
        )
    focus_methods = [m for m in ("random", "less", "gist", "mips", "rds", "bm25") if m in methods]
    lines += ["", "| target | " + " | ".join(focus_methods) + " |", "|---|" + "---|" * len(focus_methods)]
    for label, _, t, run in rows:
        cells = [f"{task_focus(t['methods'][m]['tasks'], run['pool']['tasks']):.2f}" for m in focus_methods]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    counts = {
        "targets": len(rows),
        "gist_beats_random": sum(run["goals"]["gist_beats_random"][n] for _, n, _, run in rows),
        "gist_not_above_less": sum(run["goals"]["gist_not_above_less"][n] for _, n, _, run in rows),
        "headroom": sum(run["goals"]["some_selection_beats_base"][n] for _, n, _, run in rows),
        "gist_beats_random_where_headroom": sum(
            run["goals"]["gist_beats_random"][n]
            for _, n, _, run in rows
            if run["goals"]["some_selection_beats_base"][n]
        ),
    }
    return "\n".join(lines) + "\n", counts


def main(argv=None) -> None:
    """Print the tables, then the counts as one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="quality.json files")
    args = ap.parse_args(argv)
    for p in args.results:
        if not os.path.isfile(p):
            raise SystemExit(f"{p}: not found (run benchmarks/quality.py first)")
    md, counts = tables(load(args.results))
    print(md)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
