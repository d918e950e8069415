"""Selecting the best pool examples for a target: validation gradients, subspace, scan or MIPS, output.

The exact methods (``gist``, ``gist-full``, ``less``) stream the store's chunks through one matrix product per
checkpoint and keep a running top-N; a background thread reads the next chunks while the current one is scored
(on the GPU when there is one; on the CPU, several chunks at once, one thread each). ``mips`` asks the store's
FAISS index instead. With ``--subtasks round-robin`` the scan (or the index) gives a top-N per sub-task instead,
and the sub-tasks then take turns (with ``--rerank``: for the candidates, then again on their exact scores). The
selection is written as JSON Lines, best first (round-robin: in the order taken): each original record plus
``id``, ``score`` and ``rank`` (1 = best), ready to train on.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .build import broadcast, dist_info, gather, projector_of
from .config import SelectConfig
from .data import encode, iter_lines, load_examples, parse_line
from .errors import ConfigError, ConfigMismatchError, DataError, StoreError
from .extract import CheckpointedModel
from .index import load_index, mips_per_query, mips_top
from .model import adapter_fingerprint, model_fingerprint, resolve_device
from .progress import bar as progress_bar
from .rerank import n_candidates, rerank
from .store import GradientStore
from .subspace import Scorer, Target, best_first, build_target, round_robin

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """The result of a selection: rows best first, their scores, and what the target looked like."""

    rows: np.ndarray
    scores: np.ndarray
    ids: list[str]
    target: Target
    method: str
    n_pool: int
    seconds: dict = field(default_factory=dict)
    rerank: dict = field(default_factory=dict)  # with --rerank: candidates, share of the projected top kept
    subtask_of: np.ndarray | None = None  # per selected row: the sub-task it was picked for (index)
    subtask_rule: str = "max"  # --subtasks

    def subtask_picks(self) -> dict[str, int]:
        """How many selected examples each sub-task got: under ``--subtasks max`` those whose best match it is,
        under ``round-robin`` those taken in its turns. Empty when unknown."""
        if self.subtask_of is None:
            return {}
        counts = np.bincount(self.subtask_of, minlength=len(self.target.subtasks))
        return {name: int(c) for name, c in zip(self.target.subtasks, counts)}

    def dominant_subtask(self) -> tuple[str, int] | None:
        """Under ``--subtasks max`` with two or more sub-tasks and a selection of at least two examples per
        sub-task: the sub-task that is the best match of more than half of the selection and of more than twice its
        equal share (its name and count), else None. The paper's max lets one sub-task whose direction lines up
        with much of the pool take the selection."""
        picks = self.subtask_picks()
        if self.subtask_rule != "max" or len(picks) < 2 or len(self.rows) < 2 * len(picks):
            return None
        name, count = max(picks.items(), key=lambda kv: kv[1])
        share = count / len(self.rows)
        return (name, count) if share > 0.5 and share > 2 / len(picks) else None

    def report(self) -> dict:
        """A JSON-able summary (ranks, spectrum, timing)."""
        return {
            "method": self.method,
            "n_pool": self.n_pool,
            "n_selected": int(len(self.rows)),
            "subtasks": self.target.subtasks,
            "rank": self.target.ranks,
            "unit_val": self.target.unit_val,
            "energy_captured": [round(e, 4) for e in self.target.energy_captured()],
            "singular_values": [np.round(c.singular_values, 6).tolist() for c in self.target.checkpoints],
            "checkpoint_weights": self.target.weights.tolist(),
            "score_range": [float(self.scores.min()), float(self.scores.max())] if len(self.scores) else None,
            "subtask_rule": self.subtask_rule,
            "subtask_picks": self.subtask_picks(),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            **({"rerank": self.rerank} if self.rerank else {}),
        }


def open_for_query(
    store_path: str, model: str | None = None, adapters: Sequence[str] | None = None, projection: dict | None = None
) -> GradientStore:
    """Open a finished store and refuse it when the model, adapters or projection asked for are not its own."""
    store = GradientStore.open(store_path)
    cfg = store.meta["config"]
    diffs: dict[str, tuple[object, object]] = {}
    if model is not None:
        fp = model_fingerprint(model)
        if fp.get("hash", fp["name"]) != cfg["model"].get("hash", cfg["model"]["name"]):
            diffs["model"] = (cfg["model"]["name"], model)
    if adapters is not None:
        hashes = [adapter_fingerprint(a) for a in adapters]
        if hashes != cfg["adapters"]:
            diffs["adapters"] = (store.meta.get("adapters"), list(adapters))
    if projection is not None:
        for k, v in projection.items():
            if cfg["projection"].get(k) != v:
                diffs[f"projection.{k}"] = (cfg["projection"].get(k), v)
    if diffs:
        raise ConfigMismatchError(f"{store_path}: the store was built differently", diffs)
    return store


def load_checkpointed_model(
    store: GradientStore,
    model: str | None = None,
    adapters: Sequence[str] | None = None,
    device=None,
    trust_remote_code: bool = False,
) -> CheckpointedModel:
    """The store's model and adapters (from their recorded paths unless given), checked against its fingerprints."""
    model = model or store.meta["model"]
    adapters = list(adapters or store.meta["adapters"])
    cm = CheckpointedModel(model, adapters, device, store.meta["config"]["compute"]["model_dtype"], trust_remote_code)
    now = cm.fingerprint()
    diffs = {
        k: (store.meta["config"][k], now[k])
        for k in ("model", "adapters", "lora", "source_dim")
        if store.meta["config"][k] != now[k]
    }
    if diffs:
        raise ConfigMismatchError(f"{store.path}: the model or adapters at {model} changed since the build", diffs)
    return cm


def validation_examples(store: GradientStore, cm: CheckpointedModel, target_files: Sequence[str]):
    """The target's encoded validation examples that have a response within the store's max length, and their
    sub-tasks."""
    examples = load_examples(target_files, cm.tokenizer.eos_token, what="target")
    max_length = store.meta["config"]["compute"]["max_length"]
    enc = [encode(e, cm.tokenizer, max_length) for e in examples]
    keep = [i for i, e in enumerate(enc) if e.n_label_tokens > 0]
    if not keep:
        raise DataError(
            ", ".join(target_files), None, None, f"no target example has a response within {max_length} tokens"
        )
    if len(keep) < len(enc):
        log.warning("%d target examples have no response within %d tokens; ignored", len(enc) - len(keep), max_length)
    return [enc[i] for i in keep], [examples[i].subtask for i in keep]


def validation_vectors(store: GradientStore, cm: CheckpointedModel, encoded: Sequence, batch_size: int = 16):
    """Projected (unnormalised) SGD gradients of the encoded validation examples, per checkpoint."""
    projector = projector_of(store)
    return [cm.gradients(encoded, c, projector, "sgd", batch_size)["vectors"] for c in range(len(cm.adapters))]


def _prefetch(it, depth: int = 2):
    """Run an iterator in a background thread, ``depth`` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()

    def work():
        try:
            for item in it:
                q.put(item)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)
        q.put(end)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _reduce(s: torch.Tensor, r: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``n`` best (score, row) pairs; among equal scores at the boundary, the lowest rows."""
    if len(s) <= n:
        return s, r
    v = torch.topk(s, n).values[-1]
    keep = s > v
    eq = torch.nonzero(s == v).flatten()
    eq = eq[torch.argsort(r[eq])][: n - int(keep.sum())]
    keep[eq] = True
    return s[keep], r[keep]


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run torch ops on ``n`` threads inside the block (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _scored_chunks(store: GradientStore, scorer: Scorer, chunks: Sequence[int], per_subtask: bool = False):
    """Yield (start, stop, scores on the scorer's device, -inf for rows without a gradient, best sub-task) for
    each chunk; the scores are [rows] (best sub-task's, whose index is the last item), or [rows, n_subtasks] with
    ``per_subtask`` (and no last item: None).

    A background thread reads ahead. On the CPU, as many threads as torch would use inside one op each score
    whole chunks, every op on one thread: OpenMP's parallelism inside each op synchronises its threads about ten
    times per chunk and stalls whenever another process holds a core (10x slower on a shared 2-core machine,
    see benchmarks/README.md)."""

    def score(item):
        start, stop, vecs, valid = item
        x = [torch.from_numpy(v) for v in vecs]
        s, best = (scorer.subtask_scores(x), None) if per_subtask else scorer.score(x)
        ok = torch.from_numpy(valid).to(s.device)
        return start, stop, torch.where(ok[:, None] if per_subtask else ok, s, torch.full_like(s, -torch.inf)), best

    workers = torch.get_num_threads() if scorer.device.type == "cpu" else 1
    items = _prefetch(store.iter_chunks(chunks, dtype=None), depth=max(2, workers))
    if workers <= 1:
        yield from map(score, items)
        return
    with _torch_threads(1), ThreadPoolExecutor(workers, thread_name_prefix="score") as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(score, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def scan_top(
    store: GradientStore,
    scorer: Scorer,
    n: int,
    chunks: Sequence[int] | None = None,
    progress: bool = True,
    all_scores: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``n`` rows over ``chunks`` (default all): (rows, scores), best first (ties: lower row first).
    ``all_scores`` receives every row's score."""
    rows, scores, _ = _scan(store, scorer, n, chunks, progress, all_scores, per_subtask=False)[0]
    return rows, scores


def _scan(store, scorer, n, chunks, progress, all_scores, per_subtask) -> list[tuple[np.ndarray, ...]]:
    """The top ``n`` of each score column, best first, as (rows, scores, sub-task of each row): the best
    sub-task's (one column) or, with ``per_subtask``, every sub-task's own; ``all_scores`` receives every row's
    best-sub-task score.

    In the one column, a row travels as ``row * n_subtasks + its best sub-task``: the same order, ties included,
    so the running top-N keeps each row's sub-task at no cost.

    Chunk scores are kept in a list and reduced to the best ``n`` once they hold ``2 n`` rows, so that each row
    is copied a bounded number of times (concatenating every chunk onto the running best grows as
    ``N^2 / chunk_rows`` with a top 5%: 0.13 s at N = 1e6, 13 s at 1e7)."""
    todo = range(store.n_chunks) if chunks is None else chunks
    parts: list[list] = [[] for _ in range(scorer.n_subtasks if per_subtask else 1)]
    held, n_sub = 0, scorer.n_subtasks
    for start, stop, s, best in progress_bar(
        _scored_chunks(store, scorer, todo, per_subtask), enabled=progress, total=len(todo), desc="score", unit="chunk"
    ):
        s = s if per_subtask else s[:, None]
        if all_scores is not None:
            all_scores[start:stop] = s.max(dim=1).values.cpu().numpy()
        rows = torch.arange(start, stop, device=s.device)
        rows = rows if per_subtask else rows * n_sub + best.to(rows.device)
        for j, p in enumerate(parts):
            p.append((s[:, j], rows))
        held += stop - start
        if held >= 2 * n + store.chunk_rows:
            parts = [[_reduce(torch.cat([a for a, _ in p]), torch.cat([b for _, b in p]), n)] for p in parts]
            held = max(len(p[0][0]) for p in parts)
    out = []
    for j, p in enumerate(parts):
        if not p:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)))
            continue
        best_s, best_r = _reduce(torch.cat([a for a, _ in p]), torch.cat([b for _, b in p]), n)
        r, sc = best_first(best_r.cpu().numpy(), best_s.cpu().numpy())
        out.append((r, sc, np.full(len(r), j, np.int64)) if per_subtask else (r // n_sub, sc, r % n_sub))
    return out


def select(
    store_path: str,
    target_files: Sequence[str],
    cfg: SelectConfig,
    out: str | None = None,
    checkpoint_weights: Sequence[float] | None = None,
    model: str | None = None,
    adapters: Sequence[str] | None = None,
    device=None,
    progress: bool = True,
    scores_out: str | None = None,
) -> Selection:
    """Score the store's pool for the target in ``target_files`` and return (and write) the top examples.

    Under torchrun (``WORLD_SIZE > 1``) rank 0 computes the target and broadcasts it, every rank scans its share of
    the chunks, and the per-rank top lists are merged on rank 0 (which alone writes): the same result as one
    process. Other ranks return their own share.
    """
    t0 = time.time()
    rank, world = dist_info()
    store = open_for_query(store_path)
    n = cfg.n_select(int(store.meta["summary"]["n_with_gradient"]))
    target = None
    if rank == 0:
        cm = load_checkpointed_model(store, model, adapters, device)
        val_enc, subtasks = validation_examples(store, cm, target_files)
        vecs = validation_vectors(store, cm, val_enc, cfg.batch_size)
        weights = list(checkpoint_weights) if checkpoint_weights is not None else store.meta["weights"]
        if len(weights) != store.n_checkpoints:
            raise ConfigError(f"{len(weights)} checkpoint weights for a store of {store.n_checkpoints} checkpoints")
        target = build_target(
            vecs, subtasks, weights, cfg.rank or None, cfg.energy, cfg.max_rank, unit_val=cfg.unit_val
        )
    target = broadcast(target, world)
    t1 = time.time()
    all_scores = np.full(store.n_rows, -np.inf, np.float32) if scores_out else None
    n_scan = n_candidates(cfg.rerank, n, int(store.meta["summary"]["n_with_gradient"])) if cfg.rerank else n
    per_subtask = cfg.subtasks == "round-robin"  # one top list per sub-task; else one of the best sub-task
    if cfg.method == "mips":
        index, queries = load_index(store), target.mips_queries()
        if per_subtask:
            per_query = mips_per_query(index, queries, n_scan, cfg.nprobe)
            tops = [(r, s, np.full(len(r), j)) for j, (r, s) in enumerate(per_query)]
        else:
            tops = [mips_top(index, queries, n_scan, cfg.candidates, cfg.nprobe, with_query=True)]
    else:
        scorer = Scorer(target, cfg.method, resolve_device(device))
        mine = list(range(rank, store.n_chunks, world))
        tops = _scan(store, scorer, n_scan, mine, progress and rank == 0, all_scores, per_subtask)
        if world > 1:  # each rank scanned its share of the chunks: merge their lists, column by column
            parts = gather((tops, all_scores), world)
            if rank == 0:
                tops = [
                    tuple(a[:n_scan] for a in best_first(*(np.concatenate(x) for x in zip(*[p[0][j] for p in parts]))))
                    for j in range(len(tops))
                ]  # (rows, scores, sub-task) of every rank's list, best first
                if all_scores is not None:
                    all_scores = np.max(np.stack([p[1] for p in parts]), axis=0)
    # with --rerank, the candidates: the best n_scan rows (round-robin: taken in turns)
    if per_subtask:
        taken: list[int] = []
        rows, scores = round_robin(tops, n_scan, taken)
        subtask_of = np.asarray(taken, np.int64)
    else:
        rows, scores, subtask_of = tops[0]
    t2 = time.time()
    seconds = {"validation_gradients": t1 - t0, "scoring": t2 - t1}
    extra = {}
    if cfg.rerank and rank == 0:
        projected = set(rows[:n].tolist())
        rows, scores, target, subtask_of = rerank(
            store,
            cm,
            val_enc,
            subtasks,
            rows,
            n,
            cfg.method,
            weights,
            cfg.rank or None,
            cfg.energy,
            cfg.max_rank,
            cfg.batch_size,
            progress,
            cfg.subtasks,
            unit_val=cfg.unit_val,
        )
        extra = {
            "candidates": int(n_scan),
            "kept_from_projected_top": round(len(projected & set(rows.tolist())) / max(1, len(rows)), 4),
        }
        t2, seconds["rerank"] = time.time(), time.time() - t2
    ids = (
        [str(i) for i in store.column("ids")[rows]]
        if len(rows) > 1000
        else [str(store.group["ids"][int(r)]) for r in rows]
    )
    sel = Selection(rows, scores, ids, target, cfg.method, store.n_rows, seconds, extra, subtask_of, cfg.subtasks)
    if rank == 0 and len(target.subtasks) > 1:
        log.debug("examples picked per sub-task (%s): %s", cfg.subtasks, sel.subtask_picks())
        if (dominant := sel.dominant_subtask()) is not None:
            log.warning(
                "sub-task %s is the best match of %d of the %d selected examples: under the max over sub-tasks "
                "(the paper's rule) the selection mostly serves it; --subtasks round-robin gives each of the %d "
                "sub-tasks an equal share",
                dominant[0],
                dominant[1],
                len(sel.rows),
                len(target.subtasks),
            )
    if out and rank == 0:
        write_selection(store, sel, out)
        sel.seconds["write"] = time.time() - t2
        report = {"store": os.path.abspath(store_path), "targets": list(target_files), **sel.report()}
        _atomic_text(out + ".meta.json", json.dumps(report, indent=1))
    if scores_out and rank == 0:
        np.save(scores_out, all_scores)
    return sel


def _atomic_text(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_selection(store: GradientStore, sel: Selection, out: str) -> None:
    """Write the selected records (original record + id, score, rank), best first, atomically."""
    want = {int(r): k for k, r in enumerate(sel.rows)}
    records: list[str | None] = [None] * len(sel.rows)
    source = store.column("source")
    lines = store.column("line")
    files = store.meta["data"]
    by_file: dict[int, dict[int, int]] = {}
    for r in want:
        by_file.setdefault(int(source[r]), {})[int(lines[r])] = r
    for fi, wanted_lines in sorted(by_file.items()):
        path = files[fi]["path"]
        for line_no, text in iter_lines(path):
            r = wanted_lines.get(line_no)
            if r is None:
                continue
            rec = parse_line(path, line_no, text)
            rid = str(rec["id"]) if "id" in rec else f"{os.path.basename(path)}:{line_no}"
            k = want[r]
            if rid != sel.ids[k]:
                raise StoreError(
                    f"{path}:{line_no}: holds id {rid!r} where the store has {sel.ids[k]!r} (changed since the build)"
                )
            rec["id"], rec["score"], rec["rank"] = rid, float(sel.scores[k]), k + 1
            records[k] = json.dumps(rec, ensure_ascii=False)
    if any(r is None for r in records):
        raise StoreError(f"{store.path}: some selected rows were not found in their pool files (moved or changed?)")
    _atomic_text(out, "\n".join(records) + "\n")
