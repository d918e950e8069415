"""Reading instruction data: JSON Lines (optionally gzipped) in the two formats LESS and open-instruct use.

* ``messages``: ``[{"role": "user"|"assistant"|"system", "content": str}, ...]``, rendered in the
  open-instruct/Tulu format ``<|user|>\\n...\\n<|assistant|>\\n...`` + EOS, loss on assistant tokens only;
* ``prompt`` / ``completion``: loss on the completion (and the EOS after it).

An example's id is its ``id`` field, else ``<file name>:<line>``. Targets may carry a ``subtask`` field.
Every malformed record raises :class:`~gist_index.errors.DataError` naming the file, the line and the field.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import DataError, InputNotFoundError

ROLES = ("system", "user", "assistant")
IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One validated record. ``segments`` is the rendered text as (text, is_label) pieces."""

    id: str
    path: str
    line: int
    segments: tuple[tuple[str, bool], ...]
    subtask: str | None
    record: dict

    @property
    def n_chars(self) -> int:
        """Length of the rendered text in characters (a cheap proxy for its token count)."""
        return sum(len(t) for t, _ in self.segments)


@dataclass(frozen=True)
class Encoded:
    """A tokenized example: ids, and a boolean mask of the tokens the loss is taken on."""

    input_ids: np.ndarray  # int64 [T]
    label_mask: np.ndarray  # bool [T]: token t is predicted from tokens < t
    truncated: bool  # the text was longer than max_length

    @property
    def n_tokens(self) -> int:
        """Number of tokens after truncation."""
        return int(self.input_ids.shape[0])

    @property
    def n_label_tokens(self) -> int:
        """Number of tokens that carry loss (position 0 never does: nothing predicts it)."""
        return int(self.label_mask[1:].sum())


def open_binary(path: str):
    """Open a ``.jsonl`` or ``.jsonl.gz`` file for reading bytes; a missing file is an InputNotFoundError."""
    if not os.path.isfile(path):
        raise InputNotFoundError(path, "data file")
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text) for each non-blank line; undecodable bytes are a DataError."""
    with open_binary(path) as fh:
        line_no = 0
        while True:
            try:
                raw = fh.readline()
            except (OSError, EOFError, zlib.error) as exc:
                raise DataError(path, line_no + 1, None, f"cannot be read: {exc}") from None
            if not raw:
                return
            line_no += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    path, line_no, None, f"cannot be read: not UTF-8 ({exc.reason} at byte {exc.start})"
                ) from None
            if text.strip():
                yield line_no, text


def parse_line(path: str, line_no: int, text: str) -> dict:
    """Parse one JSON line into a dict, or raise a DataError naming the line."""
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DataError(path, line_no, None, f"not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise DataError(path, line_no, None, f"expected a JSON object, got {type(record).__name__}")
    return record


def _need_str(path: str, line: int, field: str, value: object) -> str:
    if not isinstance(value, str):
        raise DataError(path, line, field, f"must be a string, got {type(value).__name__}")
    return value


def _segments_messages(path: str, line: int, messages: object, eos: str) -> list[tuple[str, bool]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(path, line, "messages", "must be a non-empty list of {role, content} objects")
    segs: list[tuple[str, bool]] = []
    has_assistant = False
    for i, msg in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise DataError(path, line, field, f"must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise DataError(path, line, f"{field}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = _need_str(path, line, f"{field}.content", msg.get("content"))
        if role == "assistant":
            has_assistant = True
            segs.append(("<|assistant|>\n", False))
            segs.append((content.strip() + eos, True))
            segs.append(("\n", False))
        else:
            segs.append((f"<|{role}|>\n" + content.strip() + "\n", False))
    if not has_assistant:
        raise DataError(path, line, "messages", "has no assistant message: nothing to take a loss on")
    if segs[-1] == ("\n", False):
        segs.pop()
    return segs


def _segments_prompt(path: str, line: int, record: dict, eos: str) -> list[tuple[str, bool]]:
    prompt = _need_str(path, line, "prompt", record.get("prompt"))
    if "completion" not in record:
        raise DataError(path, line, "completion", "missing (a record with 'prompt' needs 'completion')")
    completion = _need_str(path, line, "completion", record.get("completion"))
    if not completion.strip():
        raise DataError(path, line, "completion", "is empty: nothing to take a loss on")
    sep = "" if prompt.endswith((" ", "\n", "\t")) or completion.startswith((" ", "\n", "\t")) else " "
    return [(prompt + sep, False), (completion + eos, True)]


def parse_example(record: dict, path: str, line: int, eos: str = "</s>") -> Example:
    """Validate one record and render it; raise DataError naming the bad field."""
    name = os.path.basename(path)
    if "messages" in record:
        segs = _segments_messages(path, line, record["messages"], eos)
    elif "prompt" in record:
        segs = _segments_prompt(path, line, record, eos)
    else:
        raise DataError(path, line, "messages", "missing (a record needs 'messages' or 'prompt'/'completion')")
    rid = record.get("id")
    if rid is None:
        rid = f"{name}:{line}"
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise DataError(path, line, "id", f"must be a string or an integer, got {type(rid).__name__}")
    rid = str(rid)
    if not rid:
        raise DataError(path, line, "id", "is empty")
    subtask = record.get("subtask")
    if subtask is not None:
        subtask = _need_str(path, line, "subtask", subtask)
    return Example(id=rid, path=path, line=line, segments=tuple(segs), subtask=subtask, record=record)


def read_examples(path: str, eos: str = "</s>") -> Iterator[Example]:
    """Yield every example of one file, validated, in file order."""
    for line_no, text in iter_lines(path):
        yield parse_example(parse_line(path, line_no, text), path, line_no, eos)


def load_examples(paths: Sequence[str], eos: str = "</s>", what: str = "data") -> list[Example]:
    """Read all examples of small files (targets) into memory; an empty set is an error."""
    out: list[Example] = []
    for p in paths:
        out.extend(read_examples(p, eos))
    if not out:
        raise DataError(", ".join(paths), None, None, f"the {what} files hold no examples")
    return out


def encode(example: Example, tokenizer, max_length: int) -> Encoded:
    """Tokenize an example's segments; the label mask marks the tokens inside label segments.

    The whole text is tokenized in one call (as open-instruct does) and a token is a label when its first
    character lies inside a label segment. A BOS token is put first when the tokenizer has one. Truncation
    keeps the first ``max_length`` tokens.
    """
    text = "".join(t for t, _ in example.segments)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    label_char = np.zeros(len(text) + 1, dtype=bool)
    pos = 0
    for seg, is_label in example.segments:
        if is_label:
            label_char[pos : pos + len(seg)] = True
        pos += len(seg)
    mask = label_char[np.minimum(offsets[:, 0], len(text))] if len(ids) else np.zeros(0, dtype=bool)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = np.concatenate([[bos], ids])
        mask = np.concatenate([[False], mask])
    truncated = len(ids) > max_length
    return Encoded(input_ids=ids[:max_length], label_mask=mask[:max_length], truncated=truncated)


def sha256_file(path: str, limit: int | None = None) -> str:
    """SHA-256 of a file's bytes, streamed; with ``limit``, of its size and first and last ``limit`` bytes only."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if limit is None:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            size = os.path.getsize(path)
            h.update(str(size).encode())
            h.update(fh.read(limit))
            if size > 2 * limit:
                fh.seek(size - limit)
            h.update(fh.read(limit))
    return h.hexdigest()


def id_hash(rid: str) -> int:
    """A stable 63-bit hash of an example id (for duplicate checks that need no set of strings)."""
    return int.from_bytes(hashlib.blake2b(rid.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def check_paths(paths: Sequence[str], what: str = "data file") -> list[str]:
    """Return the paths as strings, raising InputNotFoundError for the first one that is missing."""
    out = []
    for p in paths:
        p = os.fspath(p)
        if not os.path.isfile(p):
            raise InputNotFoundError(p, what)
        out.append(p)
    return out
