"""Frozen, validated configurations of each stage, with a help text per field (the CLI is generated from them)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .errors import ConfigError

# The automatic subspace rank (select): every direction of the validation gradients, at most 128. In the
# miniature experiment (benchmarks/README.md, "The subspace's rank") keeping every direction gave a lower target
# loss than keeping 90% of the energy on 9 of 11 targets; the official GIST scripts fix k (9-150), capped by the
# number of validation examples, so with a handful of them they keep every direction too.
DEFAULT_ENERGY = 1.0
DEFAULT_MAX_RANK = 128


def opt(default, help: str, **kw):
    """A dataclass field carrying its CLI help text."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for defaults")
    return field(default=default, metadata={"help": help, **kw})


def _positive(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is not None and v <= 0:
            raise ConfigError(f"{n.replace('_', '-')} must be positive, got {v}")


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA adapter trained by ``warmup`` (paper defaults)."""

    r: int = opt(128, "LoRA rank")
    alpha: float = opt(512.0, "LoRA alpha (scaling = alpha / r)")
    dropout: float = opt(0.1, "LoRA dropout during training")
    target_modules: tuple[str, ...] = opt(("q_proj", "k_proj", "v_proj", "o_proj"), "modules that get LoRA")

    def __post_init__(self):
        _positive(self, "r", "alpha")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("target-modules must name at least one module")


@dataclass(frozen=True)
class TrainConfig:
    """A LoRA training run (warmup on a random fraction of the pool, or fine-tuning on a selection)."""

    epochs: int = opt(4, "training epochs; an adapter checkpoint is saved after each")
    lr: float = opt(2e-5, "peak learning rate (linear decay after warmup)")
    batch_size: int = opt(128, "examples per optimizer step")
    micro_batch_size: int = opt(8, "examples per forward/backward pass (gradient accumulation up to batch-size)")
    warmup_ratio: float = opt(0.03, "fraction of steps with a linearly rising learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_length: int = opt(2048, "tokens per example; longer examples are truncated")
    seed: int = opt(0, "seed for the subset, the order and the LoRA initialisation")

    def __post_init__(self):
        _positive(self, "epochs", "lr", "batch_size", "micro_batch_size", "max_length")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup-ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass(frozen=True)
class BuildConfig:
    """Building a gradient store for a pool."""

    dim: int = opt(8192, "projected dimension; 0 stores raw gradients (exact, for small adapters)")
    projection: str = opt(
        "pca",
        "projection: pca (default: the pool's principal directions, fitted on a sample of it, kept exactly and the "
        "rest CountSketched; closest to exact GIST at a given --dim, for one extra pass over the sample), "
        "countsketch (sparse, no fitting), gaussian, rademacher (dense)",
    )
    pca_rank: int = opt(0, "pca: principal directions kept exactly (0: a quarter of --dim)")
    pca_sample: int = opt(
        0,
        "pca: pool examples whose gradients (at every checkpoint) the basis is fitted to (0: a quarter of the pool, "
        "at most 4096)",
    )
    max_length: int = opt(2048, "tokens per example; an example whose response is truncated away gets no gradient")
    batch_size: int = opt(16, "examples per batch (batches are length-bucketed inside each chunk)")
    max_tokens: int = opt(0, "padded tokens per batch at most (0: no limit)")
    seed: int = opt(0, "projection seed: the same seed gives the same projection on every run and device")
    gradient: str = opt(
        "sgd",
        "sgd: plain gradients (GIST); adam: Adam-preconditioned gradients (LESS); rms: LESS's preconditioning "
        "without its momentum term, which every example shares; lora: LoRA's own r x r preconditioner (A's "
        "gradient times (B^T B)^-1, B's times (A A^T)^-1, slightly damped), the step of scaled gradient descent on "
        "the factors",
    )
    chunk_rows: int = opt(1024, "rows per chunk: the unit of work, of resume and of the manifest")
    dtype: str = opt(
        "auto",
        "stored vector type: float16, float32, int8 (half float16's bytes; each row scaled to a largest coordinate "
        "of 127), or auto (float32 with --dim 0, else int8)",
    )
    model_dtype: str = opt("float32", "dtype the model runs in: float32 or bfloat16")
    index_factory: str = opt("auto", "FAISS index factory string (e.g. Flat, SQ8, IVF1024,SQ8, HNSW32), auto or none")

    def __post_init__(self):
        _positive(self, "max_length", "batch_size", "chunk_rows")
        if self.dim < 0:
            raise ConfigError(f"dim must be >= 0, got {self.dim}")
        if self.max_tokens < 0:
            raise ConfigError(f"max-tokens must be >= 0, got {self.max_tokens}")
        _choice("gradient", self.gradient, ("sgd", "adam", "rms", "lora"))
        _choice("projection", self.projection, ("countsketch", "gaussian", "rademacher", "pca"))
        if self.pca_sample < 0:
            raise ConfigError(f"pca-sample must be >= 0, got {self.pca_sample}")
        if self.pca_rank < 0 or (self.dim and self.pca_rank >= self.dim):
            raise ConfigError(f"pca-rank must be in [0, dim), got {self.pca_rank} with dim {self.dim}")
        if self.projection == "pca" and 0 < self.dim < 2:
            raise ConfigError("projection pca needs dim >= 2 (its basis and the sketch of the rest)")
        _choice("dtype", self.dtype, ("auto", "float16", "float32", "int8"))
        _choice("model-dtype", self.model_dtype, ("float32", "bfloat16"))
        if not re.fullmatch(r"[A-Za-z0-9_,.]+", self.index_factory):
            raise ConfigError(f"index-factory {self.index_factory!r} is not a FAISS factory string")

    @property
    def vector_dtype(self) -> str:
        """The resolved storage dtype."""
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.dim == 0 else "int8"

    @property
    def pca(self) -> bool:
        """Whether the store uses the fitted pca projection."""
        return self.projection == "pca" and self.dim > 0

    @property
    def resolved_pca_rank(self) -> int:
        """The pca basis's rank at most (it is also capped by the sample's numerical rank)."""
        return self.pca_rank or max(1, self.dim // 4)

    def pca_sample_for(self, n_rows: int) -> int:
        """The pca sample's size for a pool of ``n_rows``: ``pca_sample``, or (0) a quarter of it, at most 4096."""
        return min(n_rows, self.pca_sample or max(1, min(4096, n_rows // 4)))

    def compute_config(self) -> dict:
        """The fields that change the stored vectors (hashed into the store's config)."""
        extra = {"pca_rank": self.resolved_pca_rank, "pca_sample": self.pca_sample} if self.pca else {}
        return {
            **extra,
            "dim": self.dim,
            "projection": "identity" if self.dim == 0 else self.projection,
            "max_length": self.max_length,
            "seed": self.seed,
            "gradient": self.gradient,
            "chunk_rows": self.chunk_rows,
            "dtype": self.vector_dtype,
            "model_dtype": self.model_dtype,
        }


@dataclass(frozen=True)
class SelectConfig:
    """Selecting the best examples of a store for one target."""

    method: str = opt(
        "gist",
        "gist: the paper's formula (exact scan); gist-full: its directions, cosine with the whole gradient (exact "
        "scan); less: LESS's scoring; mips: gist-full's score through the FAISS index",
    )
    rank: int = opt(0, "subspace rank k (0: chosen from the spectrum of the validation gradients)")
    energy: float = opt(
        DEFAULT_ENERGY,
        "with automatic rank: the share of squared singular values the subspace keeps (1: every direction of the "
        "validation gradients, at most --max-rank; 0.9 keeps fewer, for a cheaper scan)",
    )
    max_rank: int = opt(DEFAULT_MAX_RANK, "with automatic rank: at most this many directions (bounds the scan's cost)")
    top: int = opt(0, "select this many examples")
    fraction: float = opt(0.0, "select this fraction of the pool (e.g. 0.05)")
    batch_size: int = opt(16, "validation examples per batch")
    candidates: float = opt(
        1.0, "mips: at most this many FAISS neighbours per sub-task, as a multiple of the selection size"
    )
    nprobe: int = opt(0, "mips: IVF lists to visit (0: automatic, lists holding 16 times the neighbours asked)")
    subtasks: str = opt(
        "max",
        "how sub-tasks share the selection: max (the paper: each example scores its best sub-task, the top N "
        "overall) or round-robin (sub-tasks take turns, each taking its best example not yet taken: equal "
        "shares; with mips each sub-task's query fetches N neighbours; with --rerank the candidates are taken in "
        "turns, then the selection again on their exact scores)",
    )
    unit_val: bool = opt(
        True,
        "scale every validation gradient to unit norm before the SVD and the sub-task means (as LESS does), so no "
        "validation example counts more for a larger gradient; --no-unit-val: the paper's formula as written",
    )
    rerank: float = opt(
        0.0,
        "re-score the best RERANK x N rows of the scan (or index) on exact, unprojected gradients recomputed from "
        "the model, and keep the best N (0: off; 3 is a good value). Costs RERANK x N forward+backward passes per "
        "checkpoint and the raw validation gradients in memory (n_val x LoRA parameters floats per checkpoint)",
    )

    def __post_init__(self):
        _choice("method", self.method, ("gist", "gist-full", "less", "mips"))
        if (self.top > 0) == (self.fraction > 0):
            raise ConfigError("give exactly one of --top N or --fraction F")
        if self.top < 0 or not 0 <= self.fraction <= 1:
            raise ConfigError(f"--top must be positive and --fraction in (0, 1]; got {self.top}, {self.fraction}")
        if self.rank < 0:
            raise ConfigError(f"rank must be >= 0, got {self.rank}")
        if not 0 < self.energy <= 1:
            raise ConfigError(f"energy must be in (0, 1], got {self.energy}")
        if self.max_rank < 2:
            raise ConfigError(f"max-rank must be at least 2, got {self.max_rank}")
        _positive(self, "batch_size", "candidates")
        _choice("subtasks", self.subtasks, ("max", "round-robin"))
        if self.rerank != 0 and not self.rerank >= 1:
            raise ConfigError(f"rerank must be 0 (off) or at least 1, got {self.rerank}")

    def n_select(self, n_pool: int) -> int:
        """How many examples to select from a pool of ``n_pool``."""
        n = self.top if self.top > 0 else int(round(self.fraction * n_pool))
        return max(1, min(n, n_pool))


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def fields_of(cls) -> list[dataclasses.Field]:
    """The fields of a config class (for the CLI)."""
    return list(dataclasses.fields(cls))
