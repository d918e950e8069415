"""gist_index: targeted data selection for instruction tuning with a persistent gradient index.

Build once per pool (per-example LoRA gradients, randomly projected, in a chunked zarr store with a FAISS index),
then select for any number of targets from a handful of validation examples each (GIST, LESS or MIPS).
"""

from .api import build, info, select, verify, warmup
from .config import BuildConfig, LoraConfig, SelectConfig, TrainConfig
from .errors import (
    ConfigError,
    ConfigMismatchError,
    CorruptStoreError,
    DataError,
    GistIndexError,
    IncompleteStoreError,
    InputNotFoundError,
    ModelLoadError,
    StoreError,
    StoreNotFoundError,
)

__version__ = "0.1.0"

__all__ = [
    "BuildConfig",
    "ConfigError",
    "ConfigMismatchError",
    "CorruptStoreError",
    "DataError",
    "GistIndexError",
    "IncompleteStoreError",
    "InputNotFoundError",
    "LoraConfig",
    "ModelLoadError",
    "SelectConfig",
    "StoreError",
    "StoreNotFoundError",
    "TrainConfig",
    "build",
    "info",
    "select",
    "verify",
    "warmup",
]
