"""One table over several ``benchmarks/quality.py`` runs: every target's losses, fidelity and selection focus, and
the goals counted over all of them.

Each run (the default targets, the held-out ones) writes its own ``quality.json``; this script reads any number of
them and prints markdown tables (the ones in benchmarks/README.md) and, last, one JSON object with the counts.
A method missing from a run (an older run without ``gist-rr``) shows as ``-``.

With ``--variants`` the variants of ``quality_variants.py`` runs join the loss table as more columns (matched to
the runs' targets by name), and ``--paired A B`` compares two methods seed by seed: every selection is fine-tuned
with the same seeds (the same LoRA initialisation and shuffling generator), so the per-seed difference A - B
removes the part of the spread that the initialisation puts into both; the order of the examples still differs
where the selections do.

Reproduce::

    python benchmarks/quality_summary.py benchmarks/results/quality.json \\
        benchmarks/results/holdout-rerun/quality.json benchmarks/results/holdout2/quality.json
    python benchmarks/quality_summary.py benchmarks/results/unseen[34]-defaults/quality.json \\
        --variants benchmarks/results/unseen[34]-defaults/quality_variants*.json --paired gist-adam-unitval less
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.qualitylib.report import METHODS, fmt_loss, goals, loss_table, task_focus  # noqa: E402


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


def add_variants(rows: list[tuple[str, str, dict, dict]], paths: list[str]) -> list[str]:
    """Put the variants of each ``quality_variants.py`` JSON into the methods of the targets of the same name;
    returns the variant names, in order of first appearance. A variant measured twice on one target is refused."""
    names: list[str] = []
    by_name = {name: t for _, name, t, _ in rows}
    for p in paths:
        with open(p) as fh:
            targets = json.load(fh)["targets"]
        for name, variants in targets.items():
            if name not in by_name:
                raise SystemExit(f"{p}: target {name!r} is in none of the quality.json files given")
            for v, r in variants.items():
                if v in by_name[name]["methods"]:
                    raise SystemExit(f"{p}: {v!r} on {name!r} is given twice")
                by_name[name]["methods"][v] = r
                names += [v] if v not in names else []
    return names


def paired(rows: list[tuple[str, str, dict, dict]], a: str, b: str) -> tuple[list[str], dict]:
    """Markdown lines comparing methods ``a`` and ``b`` seed by seed on every target that has both, and the counts:
    targets where ``a``'s mean is no higher, where ``a`` is lower on every seed, and where ``b`` is."""
    lines = [f"| target | {a} | {b} | {a} - {b}, per seed | mean difference |", "|---|---|---|---|---|"]
    counts = {"targets": 0, "a_mean_not_higher": 0, "a_lower_every_seed": 0, "b_lower_every_seed": 0}
    for label, _, t, _ in rows:
        if a not in t["methods"] or b not in t["methods"]:
            continue
        la, lb = t["methods"][a]["loss"], t["methods"][b]["loss"]
        if len(la["seeds"]) != len(lb["seeds"]):
            raise SystemExit(f"{label}: {a} has {len(la['seeds'])} seeds, {b} {len(lb['seeds'])}")
        diff = [x - y for x, y in zip(la["seeds"], lb["seeds"])]
        counts["targets"] += 1
        counts["a_mean_not_higher"] += la["mean"] <= lb["mean"]
        counts["a_lower_every_seed"] += all(x < 0 for x in diff)
        counts["b_lower_every_seed"] += all(x > 0 for x in diff)
        lines.append(
            f"| {label} | {fmt_loss(la)} | {fmt_loss(lb)} | "
            + ", ".join(f"{x:+.3f}" for x in diff)
            + f" | {sum(diff) / len(diff):+.3f} |"
        )
    return lines, counts


def tables(rows: list[tuple[str, str, dict, dict]], extra: Sequence[str] = ()) -> tuple[str, dict]:
    """Markdown tables and the goal counts; ``extra``: more method columns (variants) after quality.py's."""
    methods = [m for m in METHODS if any(m in t["methods"] for _, _, t, _ in rows)] + list(extra)
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
    ap.add_argument("--variants", nargs="*", default=[], help="quality_variants.py JSON files of the same runs")
    ap.add_argument("--paired", nargs=2, metavar=("A", "B"), help="compare methods A and B seed by seed")
    args = ap.parse_args(argv)
    for p in args.results + args.variants:
        if not os.path.isfile(p):
            raise SystemExit(f"{p}: not found (run benchmarks/quality.py or quality_variants.py first)")
    rows = load(args.results)
    extra = add_variants(rows, args.variants)
    md, counts = tables(rows, extra)
    print(md)
    if args.paired:
        lines, counts["paired"] = paired(rows, *args.paired)
        print("\n".join(lines) + "\n")
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
