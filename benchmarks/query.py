"""Benchmark of queries: exact selection against the read floor, MIPS recall and cost per FAISS index type.

Synthetic stores are written through the real :class:`~gist_index.store.GradientStore` API (zarr chunks, manifest,
FAISS index), so every figure measures the real read path. Their vectors are gradient-like (see
:class:`Generator`): task clusters of a low-rank latent space, examples mixing a second cluster, per-checkpoint
bases and isotropic noise, unit-normalised and stored as float16 (``--dtype int8``: as int8). A target has 9 or
57 sub-tasks, each related to the pool but none of its clusters, with 2 to 5 validation vectors each; the selection
is the top 5%.

Measured for each store (N rows, d dims), every figure a ratio within this run:

* ``floor``: the bytes of the vector chunk files divided by the sequential read bandwidth of those same files,
  measured by reading them with plain large reads; ``exact``: :func:`gist_index.select.scan_top` with the GIST
  scorer. Both cold (every file of the store dropped from the page cache with ``posix_fadvise(DONTNEED)`` first)
  and, where the store fits in memory, warm.
* how the exact time grows with N (the exponent of a power law fitted over the N of one d);
* peak memory of an exact selection (peak RSS of a fresh process during the scan, after import and open);
* for each FAISS factory string: bytes per example, build time, query time (index in memory) and the recall of
  the exact top-N of the same MIPS objective (an exact scan with the ``mips`` scorer);
* bytes on disk per example (the store without its index, and its vectors alone).

Run ``python benchmarks/query.py --quick`` (under 10 minutes on a 2-core CPU), ``python benchmarks/query.py``
(the default preset) or ``--large`` (adds N = 1e6 at d = 8192: 33 GB of vectors, up to 16 GB per index). It
prints tables, writes ``benchmarks/results/query[-PRESET].json`` and prints one JSON object as its last line.
See benchmarks/README.md for the latest figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from gist_index import index as gindex  # noqa: E402
from gist_index.data import id_hash  # noqa: E402
from gist_index.model import resolve_device  # noqa: E402
from gist_index.select import scan_top  # noqa: E402
from gist_index.store import STATUS_OK, STATUS_TRUNCATED, GradientStore, to_stored  # noqa: E402
from gist_index.subspace import Scorer, build_target  # noqa: E402

log = logging.getLogger("benchmarks.query")

# Per preset: the stores (n_rows, dim), the target sizes (sub-tasks), repeats of each timing, and the FAISS factory
# strings compared ("auto" = the library's default for the size): the full list on stores whose float32 index
# takes at most SMALL_INDEX_BYTES, the short list on larger ones.
FULL = ["Flat", "SQfp16", "SQ8", "SQ4", "IVF{nlist},SQ8", "IVF{nlist},SQ4", "auto"]
PRESETS = {
    "quick": {
        "stores": [(10_000, 1024), (100_000, 1024), (1_000_000, 1024), (100_000, 8192)],
        "checkpoints": 1,
        "subtasks": [9, 57],
        "repeats": 1,
        "factories": {"full": FULL, "short": ["auto"]},
    },
    "default": {
        "stores": [(10_000, 1024), (100_000, 1024), (1_000_000, 1024), (10_000, 8192), (100_000, 8192)],
        "checkpoints": 2,
        "subtasks": [9, 57],
        "repeats": 2,
        "factories": {
            "full": FULL + ["IVF{nlist},PQ{m}", "OPQ{m}_{m4},IVF{nlist},PQ{m}", "HNSW32,SQ8"],
            "short": ["SQ8", "IVF{nlist},SQ8", "IVF{nlist},SQ4", "IVF{nlist},PQ{m}", "auto"],
        },
    },
}
PRESETS["large"] = {**PRESETS["default"], "stores": PRESETS["default"]["stores"] + [(1_000_000, 8192)]}
SMALL_INDEX_BYTES = 2 << 30
FRACTION = 0.05


# -- synthetic, gradient-like stores ----------------------------------------------------------------------------
class Generator:
    """Gradient-like unit vectors: task clusters in a low-rank latent space, per-checkpoint bases, noise.

    Per example i in cluster z with a second cluster z' (an example mixes skills: the clusters overlap), with
    ``a_i = s_i * (mu_z + u_i * mix * mu_z') + spread * g_i`` (``mu`` unit latent centres, ``s_i`` a log-normal
    strength, ``u_i`` uniform in [0, 1], ``g_i`` a unit latent direction), the vector at checkpoint c is
    ``normalise(sqrt(w_signal) * normalise(a_i @ B_c) + sqrt(w_noise) * e_ic)`` with ``B_c`` a random [rank, d]
    basis (correlated across checkpoints) and ``e_ic`` isotropic unit noise.
    """

    def __init__(
        self, dim: int, n_checkpoints: int, seed: int = 0, clusters: int = 200, rank: int = 64, mix: float = 0.8
    ):
        self.dim, self.n_checkpoints, self.seed = dim, n_checkpoints, seed
        self.clusters, self.rank, self.mix = clusters, rank, mix
        self.w_signal, self.w_noise, self.spread = 0.5, 0.5, 1.0
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(rank, dim, generator=g)
        self.bases = []
        for _ in range(n_checkpoints):
            b = base + 0.5 * torch.randn(rank, dim, generator=g)
            self.bases.append(b / b.norm(dim=1, keepdim=True))
        mu = torch.randn(clusters, rank, generator=g)
        self.centres = mu / mu.norm(dim=1, keepdim=True)
        sizes = np.random.default_rng(seed).dirichlet(np.full(clusters, 2.0))  # unequal cluster sizes
        self.cluster_p = sizes / sizes.sum()

    def params(self) -> dict:
        """The generator's parameters (recorded in the store's configuration)."""
        keys = ("dim", "n_checkpoints", "seed", "clusters", "rank", "mix", "w_signal", "w_noise", "spread")
        return {k: getattr(self, k) for k in keys}

    def pool_centres(self, clusters: np.ndarray, seed: int) -> torch.Tensor:
        """Latent centres of pool examples in ``clusters``: their cluster's centre plus a share of another's."""
        g = torch.Generator().manual_seed(seed)
        n = len(clusters)
        other = torch.randint(0, self.clusters, (n,), generator=g)
        share = self.mix * torch.rand(n, 1, generator=g)
        return self.centres[torch.from_numpy(np.asarray(clusters))] + share * self.centres[other]

    def sample(self, centres: torch.Tensor, seed: int) -> list[torch.Tensor]:
        """Unnormalised vectors of examples around latent ``centres`` ([n, rank]), per checkpoint: [n, dim] each."""
        g = torch.Generator().manual_seed(seed)
        n = len(centres)
        strength = torch.exp(0.5 * torch.randn(n, 1, generator=g))
        spread = torch.randn(n, self.rank, generator=g)
        spread /= spread.norm(dim=1, keepdim=True)
        a = strength * centres + self.spread * spread
        out = []
        for b in self.bases:
            noise = torch.randn(n, self.dim, generator=g)
            noise /= noise.norm(dim=1, keepdim=True)
            sig = a @ b
            sig /= sig.norm(dim=1, keepdim=True)
            out.append(math.sqrt(self.w_signal) * sig * strength.clamp(max=2) + math.sqrt(self.w_noise) * noise)
        return out

    def clusters_of(self, n: int, seed: int) -> np.ndarray:
        """Cluster labels of ``n`` pool examples."""
        return np.random.default_rng(seed).choice(self.clusters, size=n, p=self.cluster_p)


def make_store(
    path: str, n_rows: int, gen: Generator, chunk_rows: int, truncated: float = 0.005, dtype: str = "float16"
) -> GradientStore:
    """Write a synthetic store of ``n_rows`` through the GradientStore API (reused when it exists, same config)."""
    if os.path.isdir(path):
        with contextlib.suppress(Exception):
            store = GradientStore.open(path)
            if store.meta["config"] == _store_config(n_rows, gen, chunk_rows, truncated, dtype):
                return store
        GradientStore.remove(path)
    _write_store(path, n_rows, gen, chunk_rows, truncated, dtype)
    return GradientStore.open(path)


def _store_config(n_rows: int, gen: Generator, chunk_rows: int, truncated: float, dtype: str) -> dict:
    config = {"synthetic": gen.params(), "n_rows": n_rows, "chunk_rows": chunk_rows, "truncated": truncated}
    return config if dtype == "float16" else {**config, "dtype": dtype}  # float16 stores keep their old config


def _write_store(path: str, n_rows: int, gen: Generator, chunk_rows: int, truncated: float, dtype: str) -> None:
    config = _store_config(n_rows, gen, chunk_rows, truncated, dtype)
    store = GradientStore.create(path, config, chunk_rows, gen.dim, gen.n_checkpoints, dtype)
    store.set_meta(weights=[1.0 / gen.n_checkpoints] * gen.n_checkpoints, data=[])
    store.resize(n_rows)
    rng = np.random.default_rng(gen.seed + 1)
    block = chunk_rows * max(1, 65536 // chunk_rows)
    for start in range(0, n_rows, block):
        rows = np.arange(start, min(n_rows, start + block))
        ids = [f"syn-{r}" for r in rows]
        store.write_rows(
            start,
            {
                "ids": np.asarray(ids, dtype=str),
                "id_hash": np.array([id_hash(i) for i in ids], np.int64),
                "source": np.zeros(len(rows), np.int32),
                "line": rows + 1,
                "n_chars": rng.integers(200, 4000, len(rows)),
            },
        )
    store.mark_rows_done({"files": 0, "synthetic": True})
    labels = gen.clusters_of(n_rows, gen.seed + 2)
    for i in range(store.n_chunks):
        start, stop = store.chunk_range(i)
        m = stop - start
        status = np.where(rng.random(m) < truncated, STATUS_TRUNCATED, STATUS_OK).astype(np.int8)
        ok = status == STATUS_OK
        cols = {
            "n_tokens": rng.integers(64, 2048, m).astype(np.int32),
            "n_labels": np.where(ok, rng.integers(8, 512, m), 0).astype(np.int32),
            "status": status,
        }
        seed = gen.seed * 1_000_003 + i
        for c, v in enumerate(gen.sample(gen.pool_centres(labels[start:stop], seed), seed + 1)):
            norms = v.norm(dim=1)
            unit = to_stored((v / norms[:, None]).numpy(), dtype)
            unit[~ok] = 0
            cols[f"ckpt_{c}/vectors"] = unit
            cols[f"ckpt_{c}/norms"] = np.where(ok, norms.numpy(), 0).astype(np.float32)
            cols[f"ckpt_{c}/grad_norms"] = np.where(ok, 10 * norms.numpy(), 0).astype(np.float32)
            cols[f"ckpt_{c}/loss"] = np.where(ok, rng.gamma(2.0, 0.5, m), 0).astype(np.float32)
        store.write_chunk(i, cols)
    status = store.column("status")
    store.finalize(
        {
            "n_rows": n_rows,
            "n_with_gradient": int((status == STATUS_OK).sum()),
            "n_truncated": int((status != STATUS_OK).sum()),
            "index_factory": None,
            "bytes_on_disk": store.disk_bytes(),
        }
    )


def make_target(gen: Generator, n_subtasks: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """Validation vectors (per checkpoint) and sub-task labels of a target of ``n_subtasks`` sub-tasks with 2 to 5
    validation examples each. A sub-task is related to the pool but is none of its clusters: its latent centre
    mixes three pool clusters (Dirichlet weights)."""
    rng = np.random.default_rng(seed)
    centres, labels = [], []
    for s in range(n_subtasks):
        parts = rng.choice(gen.clusters, size=3, replace=False, p=gen.cluster_p)
        w = torch.from_numpy(rng.dirichlet(np.ones(3))).float()
        m = int(rng.integers(2, 6))
        centres.append((w[:, None] * gen.centres[torch.from_numpy(parts)]).sum(0).expand(m, -1))
        labels += [f"task{s}"] * m
    vecs = [v.double().numpy() for v in gen.sample(torch.cat(centres), seed + 7)]
    return vecs, labels


# -- page cache and the read floor ----------------------------------------------------------------------------
def store_files(store: GradientStore) -> list[str]:
    """Every file of a store."""
    return [os.path.join(r, f) for r, _, fs in os.walk(store.path) for f in fs]


def store_bytes(store: GradientStore) -> int:
    """Bytes on disk of a store without its FAISS index (reported per factory)."""
    skip = os.path.join(store.path, "faiss")
    return sum(os.path.getsize(p) for p in store_files(store) if not p.startswith(skip + os.sep))


def vector_files(store: GradientStore) -> list[str]:
    """The vector chunk files an exact scan reads, in scan order."""
    return [
        os.path.join(store.path, f"ckpt_{c}", "vectors", "c", str(i), "0")
        for i in range(store.n_chunks)
        for c in range(store.n_checkpoints)
    ]


def evict(paths: list[str]) -> None:
    """Drop files from the page cache (posix_fadvise DONTNEED; they are clean after the build's fsync)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(paths: list[str]) -> tuple[float, int]:
    """Read files sequentially with large reads into one buffer: (seconds, bytes)."""
    buf = bytearray(max(os.path.getsize(p) for p in paths))
    view = memoryview(buf)
    total = 0
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while True:
                k = fh.readinto(view)
                if not k:
                    break
                total += k
    return time.perf_counter() - t, total


def timed(fn, *a, **kw):
    """(seconds, result) of one call."""
    t = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t, out


def available_memory() -> int:
    """Bytes of memory available (MemAvailable), or 0 when unknown."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 0


def measure_exact(
    store: GradientStore, target, n: int, repeats: int, device: str = "cpu", compare_threads: bool = False
) -> dict:
    """Exact (GIST) selection time against the read floor, cold and (when the store fits in memory) warm; with
    ``compare_threads``, the warm time again on one thread."""
    files, vfiles = store_files(store), vector_files(store)
    scorer = Scorer(target, "gist", device)
    res: dict = {"cold": {}, "warm": {}}
    rows = None
    for _ in range(repeats):
        evict(files)
        t_floor, nbytes = plain_read(vfiles)
        evict(files)
        t_exact, (rows, _) = timed(scan_top, store, scorer, n, progress=False)
        for k, v in (("floor_s", t_floor), ("exact_s", t_exact)):
            res["cold"][k] = min(res["cold"].get(k, math.inf), v)
    res["bytes_scanned"] = nbytes
    fits = sum(os.path.getsize(p) for p in files) < 0.6 * available_memory()
    if fits:
        plain_read(vfiles)
        for _ in range(repeats):
            t_floor, _ = plain_read(vfiles)
            t_exact, _ = timed(scan_top, store, scorer, n, progress=False)
            for k, v in (("floor_s", t_floor), ("exact_s", t_exact)):
                res["warm"][k] = min(res["warm"].get(k, math.inf), v)
        if compare_threads and device == "cpu" and torch.get_num_threads() > 1:
            chosen = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                t = min(timed(scan_top, store, scorer, n, progress=False)[0] for _ in range(max(2, repeats)))
            finally:
                torch.set_num_threads(chosen)
            res["threads"] = {"threads": chosen, "exact_s": res["warm"]["exact_s"], "one_thread_exact_s": t}
    for mode in ("cold", "warm"):
        r = res[mode]
        if r:
            r["read_GBps"] = nbytes / r["floor_s"] / 1e9
            r["exact_GBps"] = nbytes / r["exact_s"] / 1e9
            r["exact_over_floor"] = r["exact_s"] / r["floor_s"]
    res["rank"] = target.ranks
    return res, rows


# -- peak memory -----------------------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    return None


def memory_probe(store_path: str, target_file: str, n: int, method: str, device: str) -> dict:
    """In this (fresh) process: RSS after imports and opening, and the peak RSS of one selection.

    The peak is VmHWM (reset first through /proc/self/clear_refs where allowed): ``ru_maxrss`` would carry the
    parent's peak over ``fork`` + ``exec``."""
    store = GradientStore.open(store_path)
    z = np.load(target_file, allow_pickle=False)
    vecs = [z[f"v{c}"] for c in range(store.n_checkpoints)]
    target = build_target(vecs, list(z["subtasks"]), [1.0] * store.n_checkpoints)
    before = _proc_status_kb("VmRSS")
    reset = False
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak RSS to the current RSS
        reset = True
    if method == "mips":
        index = gindex.load_index(store)
        gindex.mips_top(index, target.mips_queries(), n)
    else:
        scan_top(store, Scorer(target, method, device), n, progress=False)
    peak = _proc_status_kb("VmHWM") if reset else None
    gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    if before is None or peak is None:  # no /proc: ru_maxrss, an upper bound
        before = before or 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss_before": before, "rss_peak": peak, "rss_added": peak - before, "peak_reset": reset, "gpu_peak": gpu}


def measure_memory(store: GradientStore, target_vecs, labels, n: int, method: str, workdir: str, args) -> dict:
    """Run :func:`memory_probe` in a fresh process."""
    tf = os.path.join(workdir, "target.npz")
    np.savez(tf, subtasks=np.asarray(labels), **{f"v{c}": v for c, v in enumerate(target_vecs)})
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--memory-probe",
        store.path,
        tf,
        str(n),
        method,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- MIPS ------------------------------------------------------------------------------------------------------
def resolve_factory(template: str, n_rows: int, dim: int) -> str:
    """Fill ``{nlist}`` (the library's default), ``{m}`` (dim / 32 bytes of PQ code) and ``{m4}`` (4 m) into a
    factory template."""
    if template == "auto":
        return gindex.default_factory(n_rows, dim)
    nlist = gindex.default_nlist(n_rows)
    m = max(8, dim // 32)
    return template.format(nlist=nlist, m=m, m4=min(dim, 4 * m))


def index_bytes(factory: str, n_rows: int, dim: int) -> float:
    """A rough size of the index in memory (codes only), to skip factories that would not fit."""
    code = factory.split(",")[-1]
    per_value = {"Flat": 4, "SQfp16": 2, "SQ8": 1, "SQ6": 0.75, "SQ4": 0.5}.get(code)
    if per_value is None and code.startswith("PQ"):
        return n_rows * int(code[2:].split("x")[0])
    return n_rows * dim * (per_value or 4)


def nprobe_values(factory: str, auto_only: bool) -> list[int]:
    """nprobe settings to try for an IVF factory (0: the library's automatic choice), [0] otherwise."""
    nlist = next((int(p[3:]) for p in factory.split(",") if p.startswith("IVF") and p[3:].isdigit()), 0)
    if not nlist or auto_only:
        return [0]
    return [0] + [p for p in (nlist // 64, nlist // 16, nlist // 4) if p > 0]


def measure_mips(
    store: GradientStore,
    target,
    n: int,
    factories: list[str],
    workdir: str,
    sweep: bool,
    gist_rows: np.ndarray,
    device: str = "cpu",
) -> dict:
    """The exact top-N of the MIPS objective, then, per factory: build, bytes, load, query time and recall (and,
    for information, the overlap with GIST's exact top-N: MIPS is another objective)."""
    import faiss

    queries = target.mips_queries()
    D = store.dim * store.n_checkpoints
    scorer = Scorer(target, "mips", device)
    t_exact, (exact_rows, _) = timed(scan_top, store, scorer, n, progress=False)  # warm when the store fits
    exact = set(exact_rows.tolist())
    n_valid = int(store.meta["summary"]["n_with_gradient"])
    out = {
        "exact_mips_s": t_exact,
        "mips_vs_gist_overlap": len(exact.intersection(gist_rows.tolist())) / n,
        "factories": [],
    }
    index_path = os.path.join(store.path, gindex.INDEX_FILE)
    for template in factories:
        factory = resolve_factory(template, store.n_rows, D)
        label = f"auto={factory}" if template == "auto" else factory
        saved = os.path.join(workdir, "index-" + factory.replace(",", "_") + ".faiss")
        rec = {"factory": label, "template": template}
        need = index_bytes(factory, store.n_rows, D)
        no_disk = not os.path.isfile(saved) and need > 0.8 * shutil.disk_usage(workdir).free
        if need > 0.5 * available_memory() or no_disk:
            out["factories"].append({**rec, "error": f"skipped: needs about {fmt_bytes(need)} of memory and disk"})
            continue
        if os.path.isfile(saved + ".json"):  # built for an earlier target, or an earlier run, on this same store
            with open(saved + ".json") as fh:
                rec["build_s"] = json.load(fh)["build_s"]
        else:
            t0 = time.perf_counter()
            try:
                gindex.build_index(store, factory, progress=False)
            except Exception as exc:  # a factory FAISS refuses for this size is reported, not fatal
                out["factories"].append({**rec, "error": str(exc).splitlines()[0]})
                continue
            rec["build_s"] = time.perf_counter() - t0
            os.replace(index_path, saved)
            with open(saved + ".json", "w") as fh:
                json.dump({"build_s": rec["build_s"]}, fh)
        rec["bytes_per_example"] = os.path.getsize(saved) / n_valid
        t_load, index = timed(faiss.read_index, saved)
        rec["load_s"] = t_load
        k0 = max(16, math.ceil(2 * n / len(queries)))  # mips_top's first neighbours per query
        for nprobe in nprobe_values(factory, not sweep):
            t_q, (rows, _) = timed(gindex.mips_top, index, queries, n, 1.0, nprobe)
            r = {**rec, "nprobe": nprobe if nprobe else "auto", "query_s": t_q}
            if not nprobe and gindex.ivf_of(index) is not None:
                r["nprobe_auto_first"] = gindex.auto_nprobe(index, k0)
            r["recall"] = len(exact.intersection(rows.tolist())) / max(1, len(exact))
            r["speedup_vs_exact_mips"] = t_exact / t_q
            out["factories"].append(r)
            log.info("%s nprobe=%s: recall %.3f in %.2f s", label, nprobe, r["recall"], t_q)
        del index
    return out


# -- driver ----------------------------------------------------------------------------------------------------
def fmt_bytes(b: float) -> str:
    """Human-readable bytes."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(b) < 1024 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GB"


def power_law_exponent(ns: list[int], ts: list[float]) -> float | None:
    """Least-squares slope of log t against log N (1.0: linear)."""
    if len(ns) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def run_store(n_rows: int, dim: int, args, preset: dict) -> dict:
    """Build (or reuse) one synthetic store and measure it."""
    gen = Generator(dim, args.checkpoints, seed=args.seed)
    tag = "" if args.dtype == "float16" else f"-{args.dtype}"
    path = os.path.join(args.cache, f"syn-n{n_rows}-d{dim}-c{args.checkpoints}-s{args.seed}{tag}.gist")
    t_build, store = timed(make_store, path, n_rows, gen, args.chunk_rows, dtype=args.dtype)
    workdir = path + ".bench"
    os.makedirs(workdir, exist_ok=True)
    n_valid = int(store.meta["summary"]["n_with_gradient"])
    n = max(1, round(FRACTION * n_valid))
    vec_bytes = sum(os.path.getsize(p) for p in vector_files(store))
    res = {
        "n_rows": n_rows,
        "dim": dim,
        "checkpoints": args.checkpoints,
        "n_select": n,
        "store_build_s": t_build,
        "bytes_per_example": store_bytes(store) / n_rows,
        "vector_bytes_per_example": vec_bytes / n_rows,
        "targets": [],
    }
    full = n_rows * dim * args.checkpoints * 4 <= SMALL_INDEX_BYTES
    factories = preset["factories"]["full" if full else "short"]
    for s in preset["subtasks"]:
        vecs, labels = make_target(gen, s, seed=1000 + s)
        target = build_target(vecs, labels, [1.0] * args.checkpoints)
        check = n_rows >= 100_000 and not args.threads_checked  # once: the warm scan on one thread too
        exact, gist_rows = measure_exact(store, target, n, preset["repeats"], args.device, compare_threads=check)
        args.threads_checked |= check
        t = {"subtasks": s, "n_val": len(labels), "rank": target.ranks, "exact": exact}
        t["memory"] = {"gist": measure_memory(store, vecs, labels, n, "gist", workdir, args)}
        if factories and not args.no_mips:
            t["mips"] = measure_mips(store, target, n, factories, workdir, full, gist_rows, args.device)
            # the default index is the store's index: peak memory of a MIPS query with it
            auto = os.path.join(
                workdir, "index-" + resolve_factory("auto", n_rows, dim * args.checkpoints).replace(",", "_") + ".faiss"
            )
            if os.path.isfile(auto):
                os.makedirs(os.path.dirname(os.path.join(store.path, gindex.INDEX_FILE)), exist_ok=True)
                shutil.copyfile(auto, os.path.join(store.path, gindex.INDEX_FILE))
                t["memory"]["mips"] = measure_memory(store, vecs, labels, n, "mips", workdir, args)
        res["targets"].append(t)
    if not args.keep and n_rows * dim * args.checkpoints * 2 >= args.keep_below:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return res


def summarise(results: list[dict]) -> dict:
    """Headline figures: at the largest N (largest d among them), the worst target."""
    last = max(results, key=lambda r: (r["n_rows"], r["dim"]))
    ratios = [t["exact"]["cold"]["exact_over_floor"] for t in last["targets"]]
    recalls = []
    for t in last["targets"]:
        auto = [f for f in t.get("mips", {}).get("factories", []) if f["template"] == "auto" and "recall" in f]
        recalls += [f["recall"] for f in auto if f["nprobe"] == "auto"]
    growth = {}
    for d in sorted({r["dim"] for r in results}):
        rs = sorted((r for r in results if r["dim"] == d), key=lambda r: r["n_rows"])
        ns = [r["n_rows"] for r in rs]
        growth[str(d)] = {
            "exact_time_exponent": power_law_exponent(
                ns, [max(t["exact"]["cold"]["exact_s"] for t in r["targets"]) for r in rs]
            ),
            "peak_rss_mb": {
                str(r["n_rows"]): max(t["memory"]["gist"]["rss_peak"] for t in r["targets"]) / 2**20 for r in rs
            },
        }
    return {
        "n_rows": last["n_rows"],
        "dim": last["dim"],
        "exact_over_floor": max(ratios),
        "exact_over_floor_warm": max(
            (t["exact"]["warm"].get("exact_over_floor", math.nan) for t in last["targets"]), default=None
        ),
        "mips_recall": min(recalls) if recalls else None,
        "growth": growth,
    }


def print_tables(results: list[dict], summary: dict) -> None:
    """The result tables."""
    print("\nExact selection (GIST scan) against the read floor; cold = store dropped from the page cache first")
    head = (
        f"{'N':>9} {'d':>5} {'S':>3} {'k':>4} {'GB':>6} {'floor s':>8} {'exact s':>8} {'ratio':>6} "
        f"{'warm floor':>10} {'warm exact':>10} {'ratio':>6} {'peak RSS':>9} {'B/example':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        for t in r["targets"]:
            c, w = t["exact"]["cold"], t["exact"]["warm"]
            wf = f"{w['floor_s']:10.2f} {w['exact_s']:10.2f} {w['exact_over_floor']:6.1f}" if w else f"{'-':>29}"
            print(
                f"{r['n_rows']:9d} {r['dim']:5d} {t['subtasks']:3d} {max(t['rank']):4d} "
                f"{t['exact']['bytes_scanned'] / 1e9:6.2f} {c['floor_s']:8.2f} {c['exact_s']:8.2f} "
                f"{c['exact_over_floor']:6.1f} {wf} {fmt_bytes(t['memory']['gist']['rss_peak']):>9} "
                f"{fmt_bytes(r['bytes_per_example']):>10}"
            )
    print("\nGrowth with N (exponent of a power law fitted to the cold exact time; 1 = linear) and peak RSS")
    for d, g in summary["growth"].items():
        e = g["exact_time_exponent"]
        rss = ", ".join(f"N={int(n):,}: {mb:.0f} MB" for n, mb in g["peak_rss_mb"].items())
        print(f"  d={d}: exponent {'-' if e is None else f'{e:.2f}'}; {rss}")
    for r in results:
        for t in r["targets"]:
            th = t["exact"].get("threads")
            if th:
                print(
                    f"  warm scan at N={r['n_rows']:,}, d={r['dim']}: {th['threads']} threads {th['exact_s']:.2f} s, "
                    f"1 thread {th['one_thread_exact_s']:.2f} s"
                )
    print("\nMIPS: FAISS index types (recall of the exact top-N of the MIPS objective; index already in memory)")
    head = (
        f"{'N':>9} {'d':>5} {'S':>3} {'factory':<28} {'nprobe':>6} {'B/example':>10} {'build s':>8} "
        f"{'query s':>8} {'exact s':>8} {'recall':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        for t in r["targets"]:
            m = t.get("mips")
            if not m:
                continue
            for f in m["factories"]:
                if "error" in f:
                    print(f"{r['n_rows']:9d} {r['dim']:5d} {t['subtasks']:3d} {f['factory']:<28} {f['error']}")
                    continue
                b = f"{f['build_s']:8.1f}"
                print(
                    f"{r['n_rows']:9d} {r['dim']:5d} {t['subtasks']:3d} {f['factory']:<28} {f['nprobe']!s:>6} "
                    f"{fmt_bytes(f['bytes_per_example']):>10} {b} {f['query_s']:8.2f} {m['exact_mips_s']:8.2f} "
                    f"{f['recall']:7.3f}"
                )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_const", dest="preset", const="quick", help="under 10 minutes here")
    g.add_argument("--large", action="store_const", dest="preset", const="large", help="adds N=1e6 at d=8192")
    ap.add_argument("--stores", help="override the preset's stores, e.g. 10000x1024,100000x8192")
    ap.add_argument("--checkpoints", type=int, help="checkpoints per store (default: the preset's, 1 or 2)")
    ap.add_argument("--chunk-rows", type=int, default=1024, help="rows per chunk (the build's default, 1024)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "int8"], help="stored vector type")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch and FAISS CPU threads (default 0: their defaults, one per core)"
    )
    ap.add_argument("--device", default="auto", help="where the exact scan runs: auto (CUDA if present), cpu, cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cache",
        default=os.path.join(ROOT, "benchmarks", "results", "cache"),
        help="where the synthetic stores go (git-ignored)",
    )
    ap.add_argument("--keep", action="store_true", help="keep every store (default: delete those over 2 GB)")
    ap.add_argument("--no-mips", action="store_true", help="skip the FAISS part")
    ap.add_argument("--out", help="JSON results (default benchmarks/results/query[-PRESET].json)")
    ap.add_argument("--memory-probe", nargs=4, metavar=("STORE", "TARGET", "N", "METHOD"), help=argparse.SUPPRESS)
    ap.set_defaults(preset="default", keep_below=2 << 30, threads_checked=False)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        with contextlib.suppress(ImportError):
            import faiss

            faiss.omp_set_num_threads(args.threads)
    args.device = str(resolve_device(args.device))
    if args.memory_probe:
        store_path, target_file, n, method = args.memory_probe
        print(json.dumps(memory_probe(store_path, target_file, int(n), method, args.device)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    preset = dict(PRESETS[args.preset])
    args.checkpoints = args.checkpoints or preset["checkpoints"]
    if args.stores:
        preset["stores"] = [tuple(int(float(x)) for x in s.split("x")) for s in args.stores.split(",")]
    os.makedirs(args.cache, exist_ok=True)
    t0 = time.time()
    results = []
    for n_rows, dim in preset["stores"]:
        need = n_rows * dim * args.checkpoints * 2 * 1.1
        free = shutil.disk_usage(args.cache).free
        if need > 0.8 * free:
            log.warning("skipping N=%d d=%d: needs %s, %s free", n_rows, dim, fmt_bytes(need), fmt_bytes(free))
            continue
        log.info("store N=%d d=%d", n_rows, dim)
        results.append(run_store(n_rows, dim, args, preset))
    summary = summarise(results)
    print_tables(results, summary)
    out = args.out or os.path.join(
        ROOT,
        "benchmarks",
        "results",
        ("query" if args.preset == "quick" else f"query-{args.preset}")
        + ("" if args.dtype == "float16" else f"-{args.dtype}")
        + ".json",
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    report = {
        "benchmark": "query",
        "preset": args.preset,
        "seconds": round(time.time() - t0, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "fraction": FRACTION,
        "summary": summary,
        "stores": results,
    }
    with open(out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"\nwrote {os.path.relpath(out)} in {report['seconds']:.0f} s")
    print(
        json.dumps(
            {
                "benchmark": "query",
                "preset": args.preset,
                "n_rows": summary["n_rows"],
                "dim": summary["dim"],
                "exact_over_floor": round(summary["exact_over_floor"], 3),
                "mips_recall": None if summary["mips_recall"] is None else round(summary["mips_recall"], 4),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
