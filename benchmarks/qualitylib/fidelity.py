"""Fidelity: projected GIST against exact GIST on raw gradients, streamed once and never stored."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from benchmarks.qualitylib.methods import top_rows
from benchmarks.qualitylib.settings import RunSpec
from benchmarks.qualitylib.targets import TargetData
from gist_index.build import pca_held_out
from gist_index.config import DEFAULT_ENERGY, BuildConfig, SelectConfig
from gist_index.data import Example, encode
from gist_index.progress import bar as progress_bar

log = logging.getLogger("quality")
UNIT_VAL = SelectConfig.__dataclass_fields__["unit_val"].default  # select's default validation rule


def subspace_cosines(x: torch.Tensor, cs) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, n_subtasks] twice: the paper's per-checkpoint cosine, inside the subspace, with each sub-task
    direction (``gist``), and the same inner product over the norm of the whole gradient (``gist-full``)."""
    basis = torch.as_tensor(cs.basis, dtype=torch.float64)
    dirs = torch.as_tensor(cs.directions, dtype=torch.float64)
    x = x.double()
    coords = x @ basis
    dots = coords @ dirs.T
    return dots / coords.norm(dim=1, keepdim=True).clamp_min(1e-30), dots / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def streamed_scores(
    base: str,
    ckpts: Sequence[str],
    pool: Sequence[Example],
    targets: Sequence[TargetData],
    weights: Sequence[float],
    spec: RunSpec,
    variants: dict,
    progress: bool,
    block: int = 256,
    energy: float = DEFAULT_ENERGY,
    unit_val: bool = UNIT_VAL,
) -> tuple[dict, dict, dict]:
    """Raw gradients of the pool, streamed (never stored), scored per target exactly (the paper's formula on the
    raw gradients and their exact subspace) and through each projection in ``variants`` (key -> (d, stored
    dtype): CountSketch with the store's seed; or (d, stored dtype, projector): that projector; the pool rows
    unit-normalised and rounded as a store of that dtype keeps them; the validation gradients projected at full
    precision, as select computes them; the rank k from ``energy``, as ``select --energy``; ``unit_val`` as
    ``select --unit-val``, the default). Returns (exact targets,
    projected targets per key, scores: per target, ``[rows, n_subtasks]`` per (gist variant, key), key ``"exact"``
    for exact)."""
    from gist_index.extract import CheckpointedModel
    from gist_index.project import IdentityProjector, make_projector
    from gist_index.store import to_stored, unit_rows
    from gist_index.subspace import build_target

    cm = CheckpointedModel(base, ckpts, "cpu")
    tok = cm.tokenizer
    ident = IdentityProjector(cm.source_dim)
    seed = BuildConfig().seed
    sketches = {
        v[0]: make_projector("countsketch", cm.source_dim, v[0], seed) for v in variants.values() if len(v) == 2
    }
    projs = {key: v[2] if len(v) > 2 else sketches[v[0]] for key, v in variants.items()}
    n_ck = len(ckpts)
    exact, proj = {}, {}
    for t in targets:
        enc = [encode(e, tok, spec.max_length) for e in t.val]
        keep = [i for i, e in enumerate(enc) if e.n_label_tokens > 0]  # as gist_index.select does
        enc, subtasks = [enc[i] for i in keep], [t.subtasks[i] for i in keep]
        V = [torch.from_numpy(cm.gradients(enc, c, ident, "sgd", 16)["vectors"]).double() for c in range(n_ck)]
        exact[t.name] = build_target([v.numpy() for v in V], subtasks, weights, energy=energy, unit_val=unit_val)
        pv = {key: [p.project(v.float()).double().numpy() for v in V] for key, p in projs.items()}
        proj[t.name] = {
            key: build_target(pv[key], subtasks, weights, energy=energy, unit_val=unit_val) for key in variants
        }
    enc = [encode(e, tok, spec.max_length) for e in pool]
    N = len(enc)
    acc = {
        t.name: {(v, k): np.zeros((N, len(exact[t.name].subtasks))) for v in VARIANTS for k in ["exact", *variants]}
        for t in targets
    }
    bar = progress_bar(total=N * n_ck, enabled=progress, desc="raw gradients", unit="ex")
    for c in range(n_ck):
        for s in range(0, N, block):
            G = torch.from_numpy(cm.gradients(enc[s : s + block], c, ident, "sgd", 16)["vectors"])
            Gp = {id(p): p.project(G) for p in projs.values()}
            Gk = {}
            for key, (_, dtype, *_) in variants.items():
                x = Gp[id(projs[key])]
                if dtype not in ("float32", "float64"):  # as stored: unit rows in that type, read back
                    xd = x.double().numpy()
                    unit = xd / np.maximum(np.linalg.norm(xd, axis=1), 1e-30)[:, None]
                    x = torch.from_numpy(unit_rows(to_stored(unit, dtype), np.float64))
                Gk[key] = x
            for t in targets:
                a, tgt = acc[t.name], exact[t.name]
                for v, cos in zip(VARIANTS, subspace_cosines(G, tgt.checkpoints[c])):
                    a[v, "exact"][s : s + len(G)] += tgt.weights[c] * cos.numpy()
                for key in variants:
                    p = proj[t.name][key]
                    for v, cos in zip(VARIANTS, subspace_cosines(Gk[key], p.checkpoints[c])):
                        a[v, key][s : s + len(G)] += p.weights[c] * cos.numpy()
            bar.update(len(G))
    bar.close()
    return exact, proj, acc


def fidelity_cache_prefix(energy: float, unit_val: bool = UNIT_VAL) -> str:
    """The name prefix of a run's cached fidelity results at the rank rule ``energy`` and validation rule
    ``unit_val`` (runs made before the default became every direction cached theirs at 0.9 under the plain name;
    those before ``--unit-val`` became the default, without the ``u``). No prefix is the start of another."""
    return ("fidelity3u" if unit_val else "fidelity3") + ("-" if energy == 0.9 else f"e{energy:g}-")


def pca_projectors(
    base: str,
    ckpts: Sequence[str],
    pool: Sequence[Example],
    rows: np.ndarray,
    dims: Sequence[int],
    spec: RunSpec,
    hold_out: bool = True,
    gradient: str = "sgd",
    rank: int = 0,
) -> dict:
    """d -> a ``PcaProjector`` fitted as ``build --projection pca`` fits it at that ``--dim``: to the
    unit-normalised gradients (every checkpoint, through the first stage) of the pool ``rows`` that have a response
    within the length, of rank ``rank`` (0: ``--pca-rank``'s default, d/4; capped by the sample), every 8th
    sampled row left out of the fit as build leaves it out (``hold_out``; 64 rows or more)."""
    from gist_index.extract import CheckpointedModel
    from gist_index.project import PcaProjector, fit_basis, inner_projector

    cm = CheckpointedModel(base, ckpts, "cpu")
    seed = BuildConfig().seed
    inner = inner_projector(cm.source_dim, seed)
    enc = [encode(pool[int(r)], cm.tokenizer, spec.max_length) for r in rows]
    enc = [e for e in enc if e.n_label_tokens > 0]
    fit = ~pca_held_out(len(enc)) if hold_out else np.ones(len(enc), bool)
    grads = np.concatenate(
        [cm.gradients(enc, c, inner, gradient, spec.batch_size)["vectors"][fit] for c in range(len(ckpts))]
    )
    out = {}
    for d in dims:
        k = min(rank or BuildConfig(dim=d).resolved_pca_rank, d - 1)
        out[d] = PcaProjector(cm.source_dim, d, seed, fit_basis(grads, k))
        log.info("pca d=%d: basis rank %d from %d rows x %d checkpoints", d, out[d].rank, int(fit.sum()), len(ckpts))
    return out


def fidelity(streamed: tuple[dict, dict, dict], targets: Sequence[TargetData], spec: RunSpec, N: int) -> dict:
    """From :func:`streamed_scores` with one variant per d of ``spec.dims`` (keyed by d: the run's projection at
    that d, the store's seed) and, for a pca run, ``"countsketch"`` (a plain CountSketch at the store's d): exact
    GIST (raw gradients, exact subspace) against projected GIST on the same checkpoints; per target, the top-n rows
    of each and the validation spectra (``N`` pool rows)."""
    exact, proj, acc = streamed
    n = spec.n_select(N)
    out = {}
    for t in targets:
        a = acc[t.name]
        top = {k: top_rows(v.max(1), n) for k, v in a.items()}

        def overlap(v, d, top=top):
            return len(set(top[v, d].tolist()) & set(top[v, "exact"].tolist())) / n

        def reranked(v, d, a=a, top=top):
            # select --rerank R: the best R n rows of the projected scores, re-scored exactly, best n kept
            cand = top_rows(a[v, d].max(1), min(N, int(np.ceil(spec.rerank * n))))
            best = cand[top_rows(a[v, "exact"].max(1)[cand], n)]
            return len(set(best.tolist()) & set(top[v, "exact"].tolist())) / n

        out[t.name] = {
            "top_exact": top["gist", "exact"],
            "overlap": {d: overlap("gist", d) for d in spec.dims},
            "overlap_gist_full": {d: overlap("gist-full", d) for d in spec.dims},
            "overlap_rerank": {d: reranked("gist", d) for d in spec.dims},
            "overlap_gist_full_rerank": {d: reranked("gist-full", d) for d in spec.dims},
            **({"overlap_countsketch": overlap("gist", "countsketch")} if ("gist", "countsketch") in a else {}),
            "exact_gist_vs_gist_full": len(set(top["gist", "exact"].tolist()) & set(top["gist-full", "exact"].tolist()))
            / n,
            "rank_exact": exact[t.name].ranks,
            "rank_projected": {d: proj[t.name][d].ranks for d in spec.dims},
            "spectrum_exact": [c.singular_values.tolist() for c in exact[t.name].checkpoints],
            "score_corr": {
                d: float(np.corrcoef(a["gist", "exact"].max(1), a["gist", d].max(1))[0, 1]) for d in spec.dims
            },
        }
    return out


VARIANTS = ("gist", "gist-full")
FID_KEYS = (
    "overlap",
    "overlap_gist_full",
    "overlap_rerank",
    "overlap_gist_full_rerank",
    "rank_projected",
    "score_corr",
)
