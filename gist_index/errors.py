"""The project's error hierarchy.

Every error a user can cause is a :class:`GistIndexError` (a ``ValueError``), so callers can catch one type.
Errors about input data carry the file, the line and the field, and render as one line:
``pool.jsonl:17: field 'messages': must be a non-empty list``.
"""

from __future__ import annotations


class GistIndexError(ValueError):
    """Base class of every error gist_index raises on bad input, bad state or bad configuration."""


class DataError(GistIndexError):
    """A malformed input record: names the file, the 1-based line and the field."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': {message}" if field else message
        super().__init__(f"{where}: {what}")


class InputNotFoundError(GistIndexError, FileNotFoundError):
    """A file or directory named by the user does not exist."""

    def __init__(self, path: str, what: str = "file"):
        self.path = str(path)
        GistIndexError.__init__(self, f"{path}: {what} does not exist")


class ConfigError(GistIndexError):
    """An option or combination of options that cannot work."""


class ModelLoadError(GistIndexError):
    """A base model, tokenizer, adapter or optimizer state that does not load."""


class StoreError(GistIndexError):
    """A problem with a gradient store."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The path given as a store holds no gist_index store."""


class IncompleteStoreError(StoreError):
    """The store's build has not finished: it must not be read."""


class CorruptStoreError(StoreError):
    """The store's data do not match its manifest or its metadata."""


class ConfigMismatchError(StoreError):
    """A store or a query was made with a configuration different from the one asked for now."""

    def __init__(self, what: str, differences: dict[str, tuple[object, object]], hint: str = ""):
        self.differences = differences
        parts = "; ".join(f"{k}: store has {a!r}, now {b!r}" for k, (a, b) in sorted(differences.items()))
        msg = f"{what}: {parts}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
