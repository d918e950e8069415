"""quality.py's reporting: loss summaries, the goals, markdown tables and PNG plots."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

METHODS = ("random", "less", "gist", "gist-rerank", "gist-rr", "mips", "rds", "bm25")


def summarise(values: Sequence[float]) -> dict:
    """Mean, standard deviation, min and max over seeds."""
    v = np.asarray(values, np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "seeds": v.tolist(),
    }


def goals(results: dict) -> dict:
    """The issue's goals, checked on the results: GIST below random beyond the seed spread on every target,
    no higher than LESS on most; fidelity at the default d >= 0.9."""
    out = {"gist_beats_random": {}, "gist_not_above_less": {}, "some_selection_beats_base": {}}
    for name, r in results["targets"].items():
        g, rnd, less = r["methods"]["gist"]["loss"], r["methods"]["random"]["loss"], r["methods"]["less"]["loss"]
        out["gist_beats_random"][name] = bool(g["max"] < rnd["min"])
        out["gist_not_above_less"][name] = bool(g["mean"] <= less["mean"])
        # headroom: does fine-tuning on some method's selection lower the loss below the base model's, every seed?
        base = r["base"]["loss"]
        out["some_selection_beats_base"][name] = any(m["loss"]["max"] < base for m in r["methods"].values())
    fid = results["fidelity"]["top5_overlap"]
    out["all_beat_random"] = all(out["gist_beats_random"].values())
    out["most_not_above_less"] = sum(out["gist_not_above_less"].values()) > len(out["gist_not_above_less"]) / 2
    out["fidelity_ok"] = bool(fid >= 0.9)
    out["fidelity_rerank_ok"] = bool(results["fidelity"]["store_mean_rerank"] >= 0.9)
    return out


def task_focus(shares: dict, pool_counts: dict) -> float:
    """Total variation distance between a selection's task shares and the pool's task counts (normalised)."""
    n = sum(pool_counts.values())
    keys = set(shares) | set(pool_counts)
    return 0.5 * sum(abs(shares.get(k, 0.0) - pool_counts.get(k, 0) / n) for k in keys)


def fmt_loss(s: dict) -> str:
    """``mean ± std`` (the min and max over seeds stay in the JSON)."""
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def loss_table(targets: Sequence[tuple[str, dict]], methods: Sequence[str]) -> list[str]:
    """Markdown lines: a row of test losses per (name, target results), the best in bold, ``-`` where a method
    is missing (a run older than it)."""
    lines = ["| target | base (no FT) | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for name, t in targets:
        best = min(v["loss"]["mean"] for v in t["methods"].values())
        cells = []
        for m in methods:
            v = t["methods"].get(m)
            c = "-" if v is None else fmt_loss(v["loss"])
            cells.append(f"**{c}**" if v is not None and v["loss"]["mean"] == best else c)
        lines.append(f"| {name} | {t['base']['loss']:.3f} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    """The results as markdown tables."""
    R = results
    methods = [m for m in METHODS if any(m in t["methods"] for t in R["targets"].values())]
    lines = ["# quality.py results", ""]
    lines.append(
        f"Pool: {R['pool']['n']:,} examples: {R['pool']['rule']}. Selection: top {R['n_select']} "
        f"({100 * R['spec']['fraction']:.0f}%). Fine-tuning: {len(R['spec']['seeds'])} seeds per selection."
    )
    excluded = R["base"].get("spec", {}).get("exclude")
    if excluded:
        lines += ["", f"Base model pretrained without the tasks {', '.join(excluded)} (`--unseen`)."]
    for name, why in R.get("dropped_targets", {}).items():
        lines += ["", f"Target {name} not measured: only {why}."]
    lines += ["", "## Target test loss (mean ± std over seeds; lower is better)", ""]
    lines += loss_table(list(R["targets"].items()), methods)
    same = [
        f"{m} on {name} = {e['same_selection_as']}"
        for name, t in R["targets"].items()
        for m, e in t["methods"].items()
        if "same_selection_as" in e
    ]
    if same:
        lines += ["", "The same selection as another method (its fine-tunes reused): " + "; ".join(same) + "."]
    em_targets = {n: t for n, t in R["targets"].items() if "em" in t["base"]}
    if em_targets:
        lines += ["", "## Exact match (mean ± std over seeds; short-answer test examples)", ""]
        lines.append("| target | n | base (no FT) | " + " | ".join(methods) + " |")
        lines.append("|---|---|---|" + "---|" * len(methods))
        for name, t in em_targets.items():
            cells = [f"{t['methods'][m]['em']['mean']:.3f} ± {t['methods'][m]['em']['std']:.3f}" for m in methods]
            lines.append(f"| {name} | {t['n_em']} | {t['base']['em']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "## Fidelity: top-5% overlap with exact GIST on raw gradients (same checkpoints)", ""]
    dims, sd = R["spec"]["dims"], R["spec"]["dim"]
    proj = R["spec"].get("projection", "countsketch")
    cs = all("overlap_countsketch" in f for f in R["fidelity"]["targets"].values())
    lines.append(
        f"The stores: {proj} projection, {R['spec'].get('store_dtype', 'float16')} vectors, d = {sd}; the columns "
        f"d = ...: the same projection at that d, from the streamed gradients"
        + (f"; countsketch: a plain CountSketch at d = {sd}" if cs else "")
        + "; store: `gist_index.select` on the store, as a user runs it."
    )
    lines.append("")
    head = " | ".join(f"d={d}" for d in dims) + (f" | countsketch d={sd}" if cs else "") + f" | store (d={sd}) |"
    lines.append("| target | rank k exact | " + head)
    lines.append("|---|---|" + "---|" * (len(dims) + cs) + "---|")
    for name, f in R["fidelity"]["targets"].items():
        cells = [f"{f['overlap'][str(d)]:.3f}" for d in dims] + ([f"{f['overlap_countsketch']:.3f}"] if cs else [])
        lines.append(f"| {name} | {f['rank_exact']} | " + " | ".join(cells) + f" | {f['store_overlap']:.3f} |")
    mean_row = [f"{R['fidelity']['mean_overlap'][str(d)]:.3f}" for d in dims]
    if cs:
        mean_row.append(f"{np.mean([f['overlap_countsketch'] for f in R['fidelity']['targets'].values()]):.3f}")
    lines.append("| **mean** | | " + " | ".join(mean_row) + f" | {R['fidelity']['store_mean']:.3f} |")
    lines += ["", "The same for `gist-full` (cosine with the whole gradient; `mips` searches its score):", ""]
    lines.append("| target | exact top-5% shared with exact gist | " + " | ".join(f"d={d}" for d in dims) + " |")
    lines.append("|---|---|" + "---|" * len(dims))
    for name, f in R["fidelity"]["targets"].items():
        cells = [f"{f['overlap_gist_full'][str(d)]:.3f}" for d in dims]
        lines.append(f"| {name} | {f['exact_gist_vs_gist_full']:.3f} | " + " | ".join(cells) + " |")
    mean_row = [f"{R['fidelity']['mean_overlap_gist_full'][str(d)]:.3f}" for d in dims]
    lines.append("| **mean** | | " + " | ".join(mean_row) + " |")
    rr = R["spec"]["rerank"]
    lines += [
        "",
        f"With `select --rerank {rr:g}` (the best {rr:g} x N rows of the projected scores re-scored on exact "
        "gradients, the best N kept): the same overlap, computed from the streamed scores, and (last column) "
        "of the selection `gist_index` made from the store:",
        "",
    ]
    lines.append("| target | " + " | ".join(f"gist d={d}" for d in dims) + " | gist-full d=8192 | store (d=8192) |")
    lines.append("|---|" + "---|" * len(dims) + "---|---|")
    for name, f in R["fidelity"]["targets"].items():
        cells = [f"{f['overlap_rerank'][str(d)]:.3f}" for d in dims]
        cells += [f"{f['overlap_gist_full_rerank'][str(dims[-1])]:.3f}", f"{f['store_overlap_rerank']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    mean_row = [f"{R['fidelity']['mean_overlap_rerank'][str(d)]:.3f}" for d in dims]
    mean_row += [
        f"{R['fidelity']['mean_overlap_gist_full_rerank'][str(dims[-1])]:.3f}",
        f"{R['fidelity']['store_mean_rerank']:.3f}",
    ]
    lines.append("| **mean** | " + " | ".join(mean_row) + " |")
    lines += ["", "## What each method selected (largest pool tasks in the selection, share)", ""]
    lines.append(
        "Focus: the total variation distance between the selection's mix of pool tasks and the pool's own "
        "(0: the pool's mix; a random 5% scores about 0.12; 1: only tasks the pool barely has)."
    )
    lines.append("")
    lines.append("| target | method | rank k | focus | top tasks |")
    lines.append("|---|---|---|---|---|")
    for name, t in R["targets"].items():
        for m in methods:
            mt = t["methods"][m]
            tops = ", ".join(f"{k} {v:.0%}" for k, v in list(mt["tasks"].items())[:4])
            focus = task_focus(mt["tasks"], R["pool"]["tasks"])
            lines.append(f"| {name} | {m} | {mt.get('rank', '')} | {focus:.2f} | {tops} |")
    g = R["goals"]
    lines += ["", "## Goals", ""]
    lines.append(
        f"* GIST below random beyond the seed spread on every target: {g['all_beat_random']} ({g['gist_beats_random']})"
    )
    lines.append(f"* GIST no higher than LESS on most targets: {g['most_not_above_less']} ({g['gist_not_above_less']})")
    if "some_selection_beats_base" in g:
        lines.append(
            "* headroom: some method's selection lowers the loss below the base model's, with every seed "
            f"({g['some_selection_beats_base']}; where none does, fine-tuning on this pool only hurts the target "
            "and the methods are ranked by how little they hurt)"
        )
    lines.append(f"* fidelity at d={R['spec']['dim']} >= 0.9: {g['fidelity_ok']} ({R['fidelity']['top5_overlap']:.3f})")
    lines.append(
        f"* the same with `--rerank {R['spec']['rerank']:g}`: {g['fidelity_rerank_ok']} "
        f"({R['fidelity']['store_mean_rerank']:.3f})"
    )
    lines += ["", "## Time", ""]
    lines.append(
        f"Total {R['seconds']['total'] / 60:.1f} min with the cached base model "
        f"(pretraining it took {R['base']['pretrain_seconds'] / 60:.1f} min once); "
        f"reused caches: {R['reused'] or 'none'}."
    )
    lines.append("")
    lines.append(
        f"CPU time of the process {R['seconds']['cpu_total'] / 60:.1f} min on {R['seconds']['threads']} threads "
        f"(the machine is shared: wall time above CPU time / threads means other jobs took cores)."
    )
    lines.append("")
    lines.append("| stage | wall seconds | CPU seconds |")
    lines.append("|---|---|---|")
    for k, v in R["seconds"]["stages"].items():
        lines.append(f"| {k} | {v:.0f} | {R['seconds']['cpu_stages'][k]:.0f} |")
    return "\n".join(lines) + "\n"


def plots(results: dict, out: str) -> list[str]:
    """PNG plots: target loss per method and target; fidelity against d; the validation spectra."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = results
    files = []
    names = list(R["targets"])
    methods = [m for m in METHODS if m in R["targets"][names[0]]["methods"]]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        t = R["targets"][name]["methods"]
        means = [t[m]["loss"]["mean"] for m in methods]
        lo = [t[m]["loss"]["mean"] - t[m]["loss"]["min"] for m in methods]
        hi = [t[m]["loss"]["max"] - t[m]["loss"]["mean"] for m in methods]
        colors = ["#999999" if m == "random" else "#d62728" if m == "gist" else "#1f77b4" for m in methods]
        ax.bar(methods, means, yerr=[lo, hi], color=colors, capsize=3)
        spread = max(means) - min(means)
        ax.set_ylim(min(means) - max(0.5 * spread, 0.02), max(means) + max(0.5 * spread, 0.02))
        ax.set_title(name)
        ax.set_ylabel("test loss (min/max over seeds)")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    files.append(os.path.join(out, "quality_loss.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    dims = R["spec"]["dims"]
    for name, f in R["fidelity"]["targets"].items():
        ax.plot(dims, [f["overlap"][str(d)] for d in dims], "o-", label=name)
    ax.plot(dims, [R["fidelity"]["mean_overlap"][str(d)] for d in dims], "k--", label="mean")
    ax.plot(dims, [R["fidelity"]["mean_overlap_gist_full"][str(d)] for d in dims], "k:", label="gist-full, mean")
    ax.plot(dims, [R["fidelity"]["mean_overlap_rerank"][str(d)] for d in dims], "k-.", label="gist --rerank, mean")
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("projected dimension d")
    ax.set_ylabel("top-5% overlap with the exact scores")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(os.path.join(out, "quality_fidelity.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, f in R["fidelity"]["targets"].items():
        s2 = np.asarray(f["spectrum_exact"][-1]) ** 2
        cum = np.cumsum(s2) / s2.sum()
        line = ax.plot(np.arange(1, len(cum) + 1), cum, ".-", label=f"{name} (k={f['rank_exact'][-1]})")[0]
        k = f["rank_exact"][-1]
        ax.plot([k], [cum[k - 1]], "o", ms=9, mfc="none", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("k (singular directions of the validation gradients)")
    ax.set_ylabel("share of squared singular values")
    ax.set_title("validation spectrum, last checkpoint (exact)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(os.path.join(out, "quality_spectrum.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files
