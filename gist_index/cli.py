"""``gist-index``: the command line. A thin layer over :mod:`gist_index.api`; options come from the configs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing

from . import api
from .config import BuildConfig, LoraConfig, SelectConfig, TrainConfig
from .errors import GistIndexError


def _add_config(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        kind = hints[f.name]
        if typing.get_origin(kind) is tuple:
            group.add_argument(flag, dest=prefix + f.name, nargs="+", default=list(f.default), help=f.metadata["help"])
        elif kind is bool:
            group.add_argument(
                flag,
                dest=prefix + f.name,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=f.metadata["help"],
            )
        else:
            group.add_argument(
                flag,
                dest=prefix + f.name,
                type=kind,
                default=f.default,
                help=f"{f.metadata['help']} (default: {f.default})",
            )


def _config(cls, args, prefix: str = "", **extra):
    kw = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls) if hasattr(args, prefix + f.name)}
    for k, v in kw.items():
        if isinstance(v, list):
            kw[k] = tuple(v)
    return cls(**{**kw, **extra})


def _common(p: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
        p.add_argument("--trust-remote-code", action="store_true", help="let transformers run the model repo's code")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="gist-index", description="Targeted data selection with a gradient index.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("warmup", help="LoRA warmup on a random fraction of the pool (gives the adapter checkpoints)")
    p.add_argument("--model", required=True, help="base model (local directory or hub name)")
    p.add_argument("--data", nargs="+", required=True, help="pool files (.jsonl or .jsonl.gz)")
    p.add_argument("--out", required=True, help="directory for checkpoint-<step>/ folders")
    p.add_argument("--fraction", type=float, default=0.05, help="share of the pool to train on (default: 0.05)")
    _add_config(p, LoraConfig, prefix="lora_")
    _add_config(p, TrainConfig)
    _common(p)

    p = sub.add_parser("build", help="compute, project and store the pool's per-example gradients")
    p.add_argument("--model", required=True, help="base model (local directory or hub name)")
    p.add_argument("--adapter", nargs="+", required=True, help="LoRA checkpoint directories (from warmup)")
    p.add_argument(
        "--checkpoint-weights", nargs="+", type=float, help="one weight per adapter (default: mean LR per epoch)"
    )
    p.add_argument("--data", nargs="+", required=True, help="pool files (.jsonl or .jsonl.gz)")
    p.add_argument("--out", required=True, help="the store directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store built differently")
    p.add_argument("--append", action="store_true", help="add the --data files to an existing store")
    _add_config(p, BuildConfig)
    _common(p)

    p = sub.add_parser("select", help="select the best pool examples for a target")
    p.add_argument("--index", required=True, help="the store (from build)")
    p.add_argument("--target", nargs="+", required=True, help="the target's validation files")
    p.add_argument("--out", required=True, help="JSON Lines output: the selected records, best first")
    p.add_argument("--checkpoint-weights", nargs="+", type=float, help="override the store's checkpoint weights")
    p.add_argument("--model", help="the store's base model, if it moved since the build")
    p.add_argument("--adapter", nargs="+", help="the store's adapters, if they moved since the build")
    p.add_argument("--scores-out", help="also write every pool example's score (.npy, -inf where none)")
    _add_config(p, SelectConfig)
    _common(p)

    p = sub.add_parser("info", help="what a store holds")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("verify", help="check a store's chunks and metadata")
    p.add_argument("store")
    _common(p, device=False)

    p = sub.add_parser("demo", help="the whole pipeline on the bundled sample, in a few minutes on a CPU")
    p.add_argument("--workdir", default="gist-demo", help="where to put the model, checkpoints and store")
    p.add_argument("--top", type=int, default=5, help="examples to print per target")
    _common(p, device=False)
    return parser


def _print_selection(sel, out: str) -> None:
    rep = sel.report()
    print(f"method {rep['method']}: {rep['n_selected']} of {rep['n_pool']} examples -> {out}")
    print(
        f"  sub-tasks: {len(rep['subtasks'])}; rank k per checkpoint: {rep['rank']}; "
        f"energy kept: {rep['energy_captured']}"
    )
    picks = rep["subtask_picks"]
    if len(picks) > 1:
        rule = "in turns" if rep["subtask_rule"] == "round-robin" else "best match"
        print(f"  picked per sub-task ({rule}): " + ", ".join(f"{k} {v}" for k, v in picks.items()))
    if "rerank" in rep:
        rr = rep["rerank"]
        print(
            f"  re-ranked {rr['candidates']} candidates on exact gradients in {rep['seconds']['rerank']:.1f} s; "
            f"{100 * rr['kept_from_projected_top']:.0f}% of the projected top kept"
        )
    for k in range(min(5, len(sel.rows))):
        print(f"  #{k + 1}  score {sel.scores[k]:+.4f}  {sel.ids[k]}")


def run(args) -> int:
    """Execute parsed arguments; returns the exit code."""
    device = None if getattr(args, "device", "auto") == "auto" else args.device
    if args.command == "warmup":
        ckpts = api.warmup(
            args.model,
            args.data,
            args.out,
            args.fraction,
            _config(LoraConfig, args, "lora_"),
            _config(TrainConfig, args),
            device,
            args.progress,
            args.trust_remote_code,
        )
        print("checkpoints:\n" + "\n".join(f"  {c}" for c in ckpts))
    elif args.command == "build":
        store = api.build(
            args.model,
            args.adapter,
            args.data,
            args.out,
            _config(BuildConfig, args),
            checkpoint_weights=args.checkpoint_weights,
            overwrite=args.overwrite,
            append=args.append,
            device=device,
            progress=args.progress,
            trust_remote_code=args.trust_remote_code,
        )
        s = store.meta["summary"]
        print(
            f"store {args.out}: {s['n_rows']} examples, {s['n_with_gradient']} with a gradient, "
            f"{s['n_truncated']} truncated away (never selected), index {s['index_factory']}, "
            f"{s['bytes_on_disk'] / max(1, s['n_rows']):.0f} bytes/example, {s['build_seconds']:.1f} s"
        )
        if s["truncated_ids"]:
            print("  truncated: " + ", ".join(s["truncated_ids"][:5]) + (" ..." if s["n_truncated"] > 5 else ""))
    elif args.command == "select":
        sel = api.select(
            args.index,
            args.target,
            args.out,
            _config(SelectConfig, args),
            checkpoint_weights=args.checkpoint_weights,
            model=args.model,
            adapters=args.adapter,
            device=device,
            progress=args.progress,
            scores_out=args.scores_out,
        )
        _print_selection(sel, args.out)
    elif args.command == "info":
        info = api.info(args.store)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            for k, v in info.items():
                print(f"{k:>26}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    elif args.command == "verify":
        problems = api.verify(args.store, args.progress)
        if problems:
            print(f"{args.store}: {len(problems)} problem(s)")
            for p in problems:
                print(f"  - {p}")
            return 1
        print(f"{args.store}: sound")
    elif args.command == "demo":
        from .demo import run_demo

        run_demo(args.workdir, top=args.top, progress=args.progress)
    return 0


def main(argv=None) -> int:
    """Entry point of ``gist-index`` and ``python -m gist_index``."""
    args = make_parser().parse_args(argv)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 alone prints
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss").setLevel(logging.WARNING)
    try:
        return run(args)
    except GistIndexError as exc:
        print(f"gist-index: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gist-index: interrupted", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
