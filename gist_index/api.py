"""The Python API: one function per command. The CLI is a thin layer over these.

>>> import gist_index as gi
>>> ckpts = gi.warmup("base-model/", ["pool.jsonl.gz"], "warmup/")          # doctest: +SKIP
>>> store = gi.build("base-model/", ckpts, ["pool.jsonl.gz"], "pool.gist")  # doctest: +SKIP
>>> sel = gi.select("pool.gist", ["target_val.jsonl"], fraction=0.05, out="selected.jsonl")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from .build import build_store
from .config import BuildConfig, LoraConfig, SelectConfig, TrainConfig
from .data import check_paths, iter_lines, parse_example, parse_line
from .errors import ConfigError, DataError
from .model import load_base_model, load_tokenizer, resolve_device
from .select import Selection
from .select import select as _select
from .store import GradientStore

log = logging.getLogger(__name__)


def sample_pool(paths: Sequence[str], fraction: float, seed: int, eos: str = "</s>") -> list:
    """A seeded random ``fraction`` of the pool's examples (validated), streaming the files twice."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    paths = check_paths(paths)
    n = sum(1 for p in paths for _ in iter_lines(p))
    if n == 0:
        raise DataError(", ".join(paths), None, None, "no examples in the data files")
    k = max(1, int(round(fraction * n)))
    chosen = set(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())
    out, row = [], 0
    for p in paths:
        for line_no, text in iter_lines(p):
            if row in chosen:
                out.append(parse_example(parse_line(p, line_no, text), p, line_no, eos))
            row += 1
    return out


def warmup(
    model: str,
    data: Sequence[str],
    out: str,
    fraction: float = 0.05,
    lora: LoraConfig = LoraConfig(),
    train: TrainConfig = TrainConfig(),
    device=None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> list[str]:
    """LoRA warmup on a random ``fraction`` of the pool; returns the per-epoch checkpoint directories."""
    from .train import train_lora

    tok = load_tokenizer(model, trust_remote_code)
    examples = sample_pool(data, fraction, train.seed, tok.eos_token)
    log.info("warmup on %d examples (%.1f%% of the pool)", len(examples), 100 * fraction)
    dev = resolve_device(device)
    base = load_base_model(model, "float32", dev, trust_remote_code)
    for p in base.parameters():
        p.requires_grad_(False)
    base.config.name_or_path = os.path.abspath(model) if os.path.isdir(model) else model
    _, ckpts = train_lora(base, tok, examples, lora, train, out, progress, dev)
    with open(os.path.join(out, "warmup.json"), "w") as fh:
        json.dump(
            {
                "model": model,
                "data": list(data),
                "fraction": fraction,
                "n_examples": len(examples),
                "lora": lora.__dict__,
                "train": train.__dict__,
                "checkpoints": ckpts,
                "example_ids": [e.id for e in examples],
            },
            fh,
            indent=1,
            default=list,
        )
    return ckpts


def build(
    model: str, adapters: Sequence[str], data: Sequence[str], out: str, config: BuildConfig = BuildConfig(), **kw
) -> GradientStore:
    """Build a gradient store (see :func:`gist_index.build.build_store` for the keyword arguments)."""
    return build_store(model, adapters, data, out, config, **kw)


def select(
    store: str, targets: Sequence[str], out: str | None = None, config: SelectConfig | None = None, **kw
) -> Selection:
    """Select for one target. ``config`` or SelectConfig fields as keywords (``fraction=0.05``, ``method=...``);
    other keywords go to :func:`gist_index.select.select`."""
    fields = set(SelectConfig.__dataclass_fields__)
    cfg_kw = {k: kw.pop(k) for k in list(kw) if k in fields}
    if config is None:
        config = SelectConfig(**cfg_kw)
    elif cfg_kw:
        raise ConfigError(f"give either config or {sorted(cfg_kw)}, not both")
    return _select(store, check_paths(targets, "target file"), config, out, **kw)


def info(store: str) -> dict:
    """What a store holds: its build settings, its size and bytes on disk per example."""
    st = GradientStore.open(store, allow_incomplete=True)
    meta = st.meta
    disk = st.disk_bytes()
    n = max(1, st.n_rows)
    vec_bytes = sum(
        os.path.getsize(os.path.join(r, f))
        for c in range(st.n_checkpoints)
        for r, _, fs in os.walk(os.path.join(store, f"ckpt_{c}", "vectors"))
        for f in fs
    )
    index_file = os.path.join(store, "faiss", "index.faiss")
    return {
        "path": os.path.abspath(store),
        "state": meta["state"],
        "format_version": meta["format_version"],
        "n_examples": st.n_rows,
        "n_with_gradient": meta.get("summary", {}).get("n_with_gradient"),
        "n_truncated": meta.get("summary", {}).get("n_truncated"),
        "chunks": {"rows_per_chunk": st.chunk_rows, "total": st.n_chunks, "complete": len(st.done_chunks())},
        "model": meta["config"]["model"],
        "adapters": meta.get("adapters"),
        "checkpoint_weights": meta.get("weights"),
        "lora": meta["config"]["lora"],
        "projection": meta["config"]["projection"],
        "pca": meta.get("pca"),  # --projection pca: the fitted basis's rank, sample, held-out energy, digest
        "compute": meta["config"]["compute"],
        "data": [{k: f[k] for k in ("path", "sha256", "rows")} for f in meta.get("data", [])],
        "index_factory": meta.get("summary", {}).get("index_factory"),
        "bytes_on_disk": disk,
        "bytes_per_example": round(disk / n, 1),
        "vector_bytes_per_example": round(vec_bytes / n, 1),
        "index_bytes_per_example": round(os.path.getsize(index_file) / n, 1) if os.path.isfile(index_file) else 0,
        "build_seconds": meta.get("summary", {}).get("build_seconds"),
    }


def verify(store: str, progress: bool = False) -> list[str]:
    """Check a store against its manifest and metadata; an empty list means sound."""
    return GradientStore.open(store, allow_incomplete=True).verify(progress)
