"""Building a store: a validating pre-pass over the pool, then per-chunk gradients, on one or many processes.

Under ``torchrun`` (``WORLD_SIZE > 1``) the pending chunks are shared out by their character count (a proxy for
tokens, longest first onto the least loaded rank); each rank writes only its own chunks; rank 0 runs the pre-pass
before and the FAISS index and the final metadata after, between barriers. A chunk's batches depend only on the
chunk, so any split over ranks gives the same vectors. Re-running the same command resumes: complete chunks (per
the manifest) are skipped.
"""

from __future__ import annotations

import array
import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .config import BuildConfig
from .data import Example, check_paths, encode, id_hash, iter_lines, parse_example, parse_line, sha256_file
from .errors import ConfigError, ConfigMismatchError, DataError, IncompleteStoreError, StoreError
from .extract import CheckpointedModel
from .index import build_index
from .progress import bar as progress_bar
from .project import fit_basis, inner_projector, make_projector, pca_spec, projector_from_spec
from .store import STATUS_OK, STATUS_TRUNCATED, GradientStore, to_stored
from .train import checkpoint_weights as default_weights

log = logging.getLogger(__name__)


def dist_info() -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed under torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def broadcast(obj, world: int):
    """Rank 0's ``obj`` on every rank (identity in a single process)."""
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, world: int) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def describe_files(paths: Sequence[str]) -> list[dict]:
    """Name, path, size and SHA-256 of each data file (the data fingerprint)."""
    return [
        {"name": os.path.basename(p), "path": os.path.abspath(p), "size": os.path.getsize(p), "sha256": sha256_file(p)}
        for p in paths
    ]


def validate_pool(files: list[dict], eos: str, store: GradientStore | None, progress: bool) -> int:
    """Parse every record of ``files`` before anything is written: the first malformed record (file, line, field)
    or a duplicate id (within the files or with ``store``'s rows) raises a DataError. Returns the row count."""
    hashes = array.array("q")  # 8 bytes per example
    bar = progress_bar(desc="check pool", unit="ex", enabled=progress)
    for f in files:
        for line_no, text in iter_lines(f["path"]):
            hashes.append(id_hash(parse_example(parse_line(f["path"], line_no, text), f["path"], line_no, eos).id))
            bar.update(1)
    bar.close()
    if not hashes:
        raise DataError(", ".join(f["path"] for f in files), None, None, "no examples in the data files")
    old = store.column("id_hash") if store is not None and store.n_rows else np.zeros(0, np.int64)
    new = np.frombuffer(hashes, dtype=np.int64)
    uniq, counts = np.unique(np.concatenate([old, new]), return_counts=True)
    suspects = set(uniq[counts > 1].tolist())
    if suspects:
        _report_duplicate(files, eos, store, old, suspects)
    return len(hashes)


def _report_duplicate(files: list[dict], eos: str, store: GradientStore | None, old: np.ndarray, suspects: set) -> None:
    """Find where a duplicate id (hash collision aside) occurs first and again, and raise."""
    seen: dict[str, str] = {}
    if store is not None:
        for r in np.flatnonzero(np.isin(old, list(suspects))):
            f = store.meta["data"][int(store.group["source"][int(r)])]
            seen.setdefault(str(store.group["ids"][int(r)]), f"{f['path']}:{int(store.group['line'][int(r)])}")
    for f in files:
        for line_no, text in iter_lines(f["path"]):
            ex = parse_example(parse_line(f["path"], line_no, text), f["path"], line_no, eos)
            if id_hash(ex.id) in suspects:
                if ex.id in seen:
                    raise DataError(f["path"], line_no, "id", f"duplicate id {ex.id!r} (first at {seen[ex.id]})")
                seen[ex.id] = f"{f['path']}:{line_no}"


def scan_pool(store: GradientStore, files: list[dict], first_row: int, eos: str, progress: bool) -> list[dict]:
    """Write ids, id hashes, sources and lengths of ``files`` (validated already) from ``first_row`` on.
    Returns ``files`` with their row ranges."""
    R = store.chunk_rows
    block = R * max(1, 65536 // R)  # rows per write: chunk-aligned, few metadata updates
    store.resize(first_row)
    cols: dict[str, list] = {k: [] for k in ("ids", "id_hash", "source", "line", "n_chars")}
    row = start = first_row
    n_before = len(store.meta.get("data", []))
    out = []

    def flush():
        nonlocal start
        if cols["ids"]:
            store.resize(row)
            store.write_rows(start, {k: np.asarray(v, dtype=str if k == "ids" else None) for k, v in cols.items()})
            for v in cols.values():
                v.clear()
            start = row

    bar = progress_bar(desc="index pool", unit="ex", enabled=progress)
    for fi, f in enumerate(files):
        first = row
        for line_no, text in iter_lines(f["path"]):
            ex = parse_example(parse_line(f["path"], line_no, text), f["path"], line_no, eos)
            cols["ids"].append(ex.id)
            cols["id_hash"].append(id_hash(ex.id))
            cols["source"].append(n_before + fi)
            cols["line"].append(line_no)
            cols["n_chars"].append(ex.n_chars)
            row += 1
            bar.update(1)
            if row % block == 0:
                flush()
        out.append({**f, "rows": [first, row]})
    flush()
    bar.close()
    return out


def iter_chunk_examples(store: GradientStore, chunks: Sequence[int], eos: str) -> Iterator[tuple[int, list[Example]]]:
    """Yield (chunk, its examples) for the given chunks, in row order, streaming the data files once."""
    wanted = sorted(chunks)
    files = store.meta["data"]
    R = store.chunk_rows
    k = 0
    buf: list[Example] = []
    for f in files:
        a, b = f["rows"]
        if k >= len(wanted):
            return
        if b <= wanted[k] * R:
            continue
        row = a
        for line_no, text in iter_lines(f["path"]):
            while k < len(wanted) and row >= store.chunk_range(wanted[k])[1]:
                k += 1
            if k >= len(wanted):
                return
            lo, hi = store.chunk_range(wanted[k])
            if row >= lo:
                buf.append(parse_example(parse_line(f["path"], line_no, text), f["path"], line_no, eos))
                if row + 1 == hi:
                    yield wanted[k], buf
                    buf = []
            row += 1
        if row != b:
            raise StoreError(f"{f['path']}: has {row - a} examples now, {b - a} when the store was built")


def compute_chunk(
    examples: Sequence[Example], cm: CheckpointedModel, projector, cfg: BuildConfig, on_batch=None
) -> dict:
    """Every column of one chunk: token counts, status and, per checkpoint, unit vectors and norms."""
    enc = [encode(ex, cm.tokenizer, cfg.max_length) for ex in examples]
    n_labels = np.array([e.n_label_tokens for e in enc], np.int32)
    ok = np.flatnonzero(n_labels > 0)
    cols = {
        "n_tokens": np.array([e.n_tokens for e in enc], np.int32),
        "n_labels": n_labels,
        "status": np.where(n_labels > 0, STATUS_OK, STATUS_TRUNCATED).astype(np.int8),
    }
    vdt = np.dtype(cfg.vector_dtype)
    for c in range(len(cm.adapters)):
        res = cm.gradients([enc[i] for i in ok], c, projector, cfg.gradient, cfg.batch_size, cfg.max_tokens, on_batch)
        norms = np.linalg.norm(res["vectors"], axis=1)
        vec = np.zeros((len(enc), projector.dim), vdt)
        vec[ok] = to_stored(res["vectors"] / np.maximum(norms, 1e-30)[:, None], cfg.vector_dtype)
        cols[f"ckpt_{c}/vectors"] = vec
        for key, val in (("norms", norms), ("grad_norms", res["grad_norm"]), ("loss", res["loss"])):
            full = np.zeros(len(enc), np.float32)
            full[ok] = val
            cols[f"ckpt_{c}/{key}"] = full
    return cols


def assign_chunks(char_totals: dict[int, int], world: int) -> list[list[int]]:
    """Longest-processing-time assignment of chunks to ranks by character count."""
    loads = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(char_totals, key=lambda i: (-char_totals[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += char_totals[i]
    return [sorted(x) for x in out]


def _open_or_create(
    out: str,
    config: dict,
    files: list[dict],
    cfg: BuildConfig,
    n_ckpt: int,
    dim: int,
    overwrite: bool,
    append: bool,
    eos: str,
    progress: bool,
) -> tuple[GradientStore, list[dict]]:
    """Rank 0: the store to work on, and the data files still to scan (empty when resuming after the scan).
    New data are validated before the store is created or changed, so bad input leaves nothing half-written."""
    if append and not os.path.exists(out):
        raise StoreError(f"{out}: --append needs an existing store")
    if overwrite and os.path.exists(out):
        validate_pool(files, eos, None, progress)
        GradientStore.remove(out)
    elif not os.path.exists(out):
        validate_pool(files, eos, None, progress)
    if not os.path.exists(out):
        store = GradientStore.create(out, config, cfg.chunk_rows, dim, n_ckpt, cfg.vector_dtype)
        store.set_meta(data=[], pending=files)
        return store, files
    store = GradientStore.open(out, allow_incomplete=True, mode="r+")
    store.check_config(config)
    done = store.meta.get("data", [])
    key = lambda fs: sorted((f["name"], f["sha256"]) for f in fs)  # noqa: E731
    if append:
        new = [f for f in files if (f["name"], f["sha256"]) not in set(key(done))]
        if len(new) not in (0, len(files)):
            raise StoreError(f"{out}: some of the --append files are in the store already, some not")
        if new:
            if store.meta["state"] != "complete":
                raise StoreError(f"{out}: finish the interrupted build before appending (re-run it)")
            validate_pool(new, eos, store, progress)
            store.mark_building()
            store.set_meta(pending=new)
            return store, new
        return store, []
    wanted = key(store.meta.get("pending", [])) if store.rows_done() is None else key(done)
    if key(files) != wanted:
        raise ConfigMismatchError(
            f"{out}: built from other data files",
            {"data": ([n for n, _ in wanted], [n for n, _ in key(files)])},
            "use --append to add files, or --overwrite",
        )
    return store, (files if store.rows_done() is None else [])


def build_store(
    model: str,
    adapters: Sequence[str],
    data: Sequence[str],
    out: str,
    cfg: BuildConfig = BuildConfig(),
    checkpoint_weights: Sequence[float] | None = None,
    overwrite: bool = False,
    append: bool = False,
    device=None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> GradientStore:
    """Build (or resume, or ``append`` to) the store at ``out``; see the module docstring."""
    t0 = time.time()
    rank, world = dist_info()
    if world > 1 and torch.cuda.is_available() and device in (None, "auto"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    paths = check_paths(data)
    if checkpoint_weights is not None and len(checkpoint_weights) != len(adapters):
        raise ConfigError(f"{len(checkpoint_weights)} checkpoint weights for {len(adapters)} adapters")
    cm = CheckpointedModel(model, adapters, device, cfg.model_dtype, trust_remote_code)
    if cfg.dim >= cm.source_dim:
        log.info("--dim %d is not below the %d LoRA parameters: storing raw gradients (exact)", cfg.dim, cm.source_dim)
        cfg = dataclasses.replace(cfg, dim=0)
    if cfg.pca:  # fitted below, once the pool is scanned; the config names its settings (the rank asked for)
        projector = None
        spec = pca_spec(cm.source_dim, cfg.dim, cfg.seed, cfg.resolved_pca_rank)
    else:
        projector = make_projector(cfg.projection, cm.source_dim, cfg.dim, cfg.seed)
        spec = projector.spec()
    config = {"compute": cfg.compute_config(), **cm.fingerprint(), "projection": spec}
    weights = list(checkpoint_weights) if checkpoint_weights is not None else default_weights(cm.adapters)
    eos = cm.tokenizer.eos_token
    if rank == 0:
        files = describe_files(paths)
        store, to_scan = _open_or_create(
            out, config, files, cfg, len(adapters), cfg.dim or cm.source_dim, overwrite, append, eos, progress
        )
        store.set_meta(model=model, adapters=[os.path.abspath(a) for a in cm.adapters], weights=weights, eos=eos)
        index_from = 0
        if to_scan or store.rows_done() is None:
            committed = store.meta.get("data", [])
            first = committed[-1]["rows"][1] if committed else 0
            if first % store.chunk_rows:
                store.invalidate_chunk(first // store.chunk_rows)
            index_from = (first // store.chunk_rows) * store.chunk_rows if append else 0
            scanned = scan_pool(store, to_scan or store.meta["pending"], first, eos, progress)
            store.set_meta(data=committed + scanned, pending=[])
            store.mark_rows_done({"files": len(committed) + len(scanned)})
        if cfg.pca and store.meta.get("pca") is None:
            fit_pca(store, cm, cfg, eos, progress)
        done = store.done_chunks()
        n_chars = store.column("n_chars")
        totals = {i: int(n_chars[slice(*store.chunk_range(i))].sum()) for i in range(store.n_chunks) if i not in done}
        plan = assign_chunks(totals, world)
        log.info("%d of %d chunks to compute, on %d process(es)", len(totals), store.n_chunks, world)
    _barrier(world)
    plan = broadcast(plan if rank == 0 else None, world)
    store = GradientStore.open(out, allow_incomplete=True, mode="r+") if rank else store
    if projector is None:
        projector = projector_of(store)
    mine = plan[rank]
    n_mine = sum(min(store.n_rows, (i + 1) * store.chunk_rows) - i * store.chunk_rows for i in mine) * len(adapters)
    bar = progress_bar(
        total=n_mine, desc=f"gradients[{rank}]" if world > 1 else "gradients", unit="ex", enabled=progress and rank == 0
    )
    for i, examples in iter_chunk_examples(store, mine, eos):
        cols = compute_chunk(examples, cm, projector, cfg, on_batch=bar.update)
        bar.update(int((cols["status"] != STATUS_OK).sum()) * len(adapters))
        store.write_chunk(i, cols)
    bar.close()
    _barrier(world)
    if rank == 0:
        _finish(store, cfg, t0, progress, index_from)
    _barrier(world)
    return GradientStore.open(out)


def _finish(store: GradientStore, cfg: BuildConfig, t0: float, progress: bool, index_from: int) -> None:
    """Rank 0, after every chunk: the FAISS index (built, or extended from ``index_from``), then the summary."""
    missing = store.n_chunks - len(store.done_chunks())
    if missing:
        raise StoreError(f"{store.path}: {missing} chunks are still missing after the build; re-run to resume")
    status = store.column("status")
    trunc = np.flatnonzero(status != STATUS_OK)
    previous = store.meta.get("summary", {}).get("index_factory")
    factory = build_index(store, previous if index_from and previous else cfg.index_factory, progress, index_from)
    summary = {
        "n_rows": store.n_rows,
        "n_with_gradient": int((status == STATUS_OK).sum()),
        "n_truncated": int(len(trunc)),
        "truncated_ids": [str(store.group["ids"][int(r)]) for r in trunc[:20]],
        "index_factory": factory,
        "build_seconds": round(time.time() - t0, 2),
        "bytes_on_disk": store.disk_bytes(),
    }
    store.finalize(summary)


_PCA_PROJECTORS: dict[tuple[str, str], object] = {}  # (store path, basis digest) -> projector, most recent 2


def projector_of(store: GradientStore):
    """The projector a store was built with (``pca``: with its fitted basis, checked against its digest). A pca
    projector is kept for the process's next query of the same store and basis (reading and checking a basis of
    up to 0.5 GB is most of a small store's query time)."""
    spec = store.meta["config"]["projection"]
    if spec["kind"] != "pca":
        return projector_from_spec(spec)
    key = (os.path.abspath(store.path), (store.meta.get("pca") or {}).get("digest", ""))
    if key in _PCA_PROJECTORS:
        return _PCA_PROJECTORS[key]
    basis = store.pca_basis()
    if basis is None:
        raise IncompleteStoreError(f"{store.path}: the pca basis has not been fitted; re-run the build to resume")
    projector = projector_from_spec(spec, basis)
    while len(_PCA_PROJECTORS) >= 2:
        _PCA_PROJECTORS.pop(next(iter(_PCA_PROJECTORS)))
    _PCA_PROJECTORS[key] = projector
    return projector


def pca_sample_rows(n_rows: int, sample: int, seed: int) -> np.ndarray:
    """The pool rows (sorted) whose gradients a pca basis is fitted to: a seeded uniform sample of ``sample``."""
    return np.sort(np.random.default_rng(seed).choice(n_rows, min(sample, n_rows), replace=False))


def pca_held_out(n_sampled: int) -> np.ndarray:
    """Which of the pca sample's examples (with a gradient, in row order) the fit leaves out, to measure the basis
    on: every 8th, once there are 64 or more."""
    held = np.zeros(n_sampled, bool)
    if n_sampled >= 64:
        held[::8] = True
    return held


def fit_pca(store: GradientStore, cm: CheckpointedModel, cfg: BuildConfig, eos: str, progress: bool) -> np.ndarray:
    """Rank 0, after the pre-pass: fit the pca basis to the gradients (``cfg.gradient``, every checkpoint,
    through the projection's first stage) of a seeded sample of the pool (``cfg.pca_sample_for``), and store it.

    With 64 or more sampled examples every 8th is held out of the fit, and the share of its squared norm the
    basis holds is recorded (``energy_held_out``): the residual the sketch carries is the rest, so below 0.5 a
    plain CountSketch of the same ``dim`` would be the closer approximation (a warning says so)."""
    t0 = time.time()
    rows = pca_sample_rows(store.n_rows, cfg.pca_sample_for(store.n_rows), cfg.seed)
    enc = []
    for i, examples in iter_chunk_examples(store, sorted({int(r) // store.chunk_rows for r in rows}), eos):
        lo, hi = store.chunk_range(i)
        enc += [encode(examples[int(r) - lo], cm.tokenizer, cfg.max_length) for r in rows[(rows >= lo) & (rows < hi)]]
    enc = [e for e in enc if e.n_label_tokens > 0]
    if not enc:
        raise DataError(f"{store.path}: no sampled pool example has a response within --max-length to fit pca to")
    inner = inner_projector(cm.source_dim, cfg.seed)
    n_ck = len(cm.adapters)
    bar = progress_bar(total=len(enc) * n_ck, desc="pca sample", unit="ex", enabled=progress)
    grads = [
        cm.gradients(enc, c, inner, cfg.gradient, cfg.batch_size, cfg.max_tokens, bar.update)["vectors"]
        for c in range(n_ck)
    ]
    bar.close()
    held = pca_held_out(len(enc))
    basis = fit_basis(np.concatenate([g[~held] for g in grads]), cfg.resolved_pca_rank, device=cm.device)
    info = {"sample": int((~held).sum()), "held_out": int(held.sum())}
    if held.any():
        h = torch.from_numpy(np.concatenate([g[held] for g in grads])).to(cm.device)
        norms = torch.linalg.vector_norm(h, dim=1)
        h, norms = h[norms > 0], norms[norms > 0]
        inside = torch.linalg.vector_norm(h @ torch.from_numpy(basis).to(cm.device), dim=1)
        info["energy_held_out"] = round(float((inside**2 / norms**2).mean()), 4)
        if info["energy_held_out"] < 0.5:
            log.warning(
                "pca basis holds only %.2f of held-out gradients' squared norm: a plain --projection countsketch "
                "would approximate them more closely at this --dim (or raise --pca-rank / --pca-sample)",
                info["energy_held_out"],
            )
    info["seconds"] = round(time.time() - t0, 2)
    store.write_pca_basis(basis, info)
    log.info(
        "pca basis: rank %d from %d sampled examples x %d checkpoints in %.1f s; held-out energy %s",
        basis.shape[1],
        info["sample"],
        n_ck,
        time.time() - t0,
        info.get("energy_held_out", "not measured (fewer than 64 sampled)"),
    )
    return basis
