"""The gradient store: one zarr v3 group, chunked by rows, with a per-chunk manifest of checksums.

Layout of ``STORE/``::

    zarr.json                 group; attribute ``gist_index`` holds the format version, state and build metadata
    ids, source, line         example id (string), index of its pool file, 1-based line in that file
    n_chars, n_tokens, n_labels, status
                              status 0: has a gradient; 1: response truncated away (no gradient, never selected)
    ckpt_<c>/vectors          [N, dim] unit-norm projected gradients at checkpoint c (float16 or float32, crc32c;
                              int8: each row scaled so that its largest coordinate is +-127, see to_stored)
    ckpt_<c>/norms            [N] norm of the projected gradient before normalisation
    ckpt_<c>/grad_norms, ckpt_<c>/loss
    manifest/rows.json        the pre-pass (ids, sources, lengths) is complete
    manifest/chunk-<i>.json   chunk i is complete: its rows and the SHA-256 of every file of the chunk
    faiss/index.faiss         the persistent FAISS index (written when the build finalises)
    pca_basis                 [inner_dim, rank] float32, only with ``--projection pca``: the fitted basis; its
                              digest, rank and sample size are in the metadata (``pca``)

A manifest entry is written (atomically, after the chunk's files are fsync'ed) only once all of a chunk's data
are durable, so a build killed at any moment resumes from the complete chunks. Readers refuse a store whose state
is not ``complete``. Nothing in a store is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from .data import sha256_file
from .errors import ConfigMismatchError, CorruptStoreError, IncompleteStoreError, StoreError, StoreNotFoundError

log = logging.getLogger(__name__)

FORMAT = "gist_index.store"
FORMAT_VERSION = 1
ROW_ARRAYS = {"ids": str, "id_hash": "int64", "source": "int32", "line": "int64", "n_chars": "int64"}
CHUNK_ARRAYS = {"n_tokens": "int32", "n_labels": "int32", "status": "int8"}
CKPT_ARRAYS = {"norms": "float32", "grad_norms": "float32", "loss": "float32"}
STATUS_OK, STATUS_TRUNCATED = 0, 1
READAHEAD_BYTES = 64 << 20  # iter_chunks asks the kernel for this many bytes of vector files ahead of the reader
INT8_MAX = 127


def to_stored(unit: np.ndarray, dtype: str) -> np.ndarray:
    """Unit rows as the store keeps them: cast to ``dtype``; for ``int8``, each row scaled so that its largest
    coordinate is +-127 and rounded (its direction is what every score uses). The rounding error is about 1% of a
    coordinate's typical size when the coordinates are near Gaussian (the largest of 8192 is about 4.3 times the
    typical), far below the projection's own noise. Zero rows stay zero."""
    if dtype != "int8":
        return unit.astype(dtype)
    peak = np.abs(unit).max(axis=1, keepdims=True)
    return np.rint(unit * (INT8_MAX / np.maximum(peak, 1e-30))).astype(np.int8)


def unit_rows(stored: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Stored rows back as unit rows of ``dtype`` (int8 rows rescaled to norm 1; zero rows stay zero)."""
    if stored.dtype != np.int8:
        return np.asarray(stored, dtype=dtype)
    x = stored.astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    return x.astype(dtype, copy=False)


def atomic_write_json(path: str, obj) -> None:
    """Write JSON to ``path`` durably: temp file, fsync, rename, fsync of the directory."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(d)


def fsync_dir(d: str) -> None:
    """fsync a directory so that renames and new files in it are durable."""
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def config_hash(config: dict) -> str:
    """A short stable hash of a JSON-able configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def diff_configs(old: dict, new: dict, prefix: str = "") -> dict[str, tuple[object, object]]:
    """Flattened differences between two nested dicts: {dotted key: (old, new)}."""
    out: dict[str, tuple[object, object]] = {}
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(diff_configs(a, b, key + "."))
        elif a != b:
            out[key] = (a, b)
    return out


class GradientStore:
    """A gradient store on disk. Create with :meth:`create`, reopen with :meth:`open`."""

    def __init__(self, path: str, group: zarr.Group):
        self.path = path
        self.group = group
        self.meta: dict = dict(group.attrs.get("gist_index", {}))

    # -- creation and opening ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, path: str, config: dict, chunk_rows: int, dim: int, n_checkpoints: int, dtype: str
    ) -> GradientStore:
        """Create an empty store in state ``building`` (rows come later, with :meth:`resize`).

        The group is made in a temporary directory beside ``path`` and renamed into place once its metadata are
        written, so a crash never leaves a directory at ``path`` that is not a store.
        """
        if os.path.exists(path):
            raise StoreError(f"{path}: already exists (use --overwrite to replace it)")
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.creating-")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "state": "building",
            "config": config,
            "config_hash": config_hash(config),
            "chunk_rows": int(chunk_rows),
            "dim": int(dim),
            "n_checkpoints": int(n_checkpoints),
            "dtype": dtype,
            "n_rows": 0,
        }
        try:
            group = zarr.open_group(tmp, mode="w", zarr_format=3)
            group.attrs["gist_index"] = meta
            fsync_dir(tmp)
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(parent)
        return cls(path, zarr.open_group(path, mode="r+", zarr_format=3))

    @classmethod
    def open(cls, path: str, allow_incomplete: bool = False, mode: str = "r") -> GradientStore:
        """Open a store, reading the format version first; refuse an unfinished store unless allowed."""
        if not os.path.isfile(os.path.join(path, "zarr.json")):
            raise StoreNotFoundError(f"{path}: no gist_index store here (no zarr.json)")
        try:
            group = zarr.open_group(path, mode=mode, zarr_format=3)
        except Exception as exc:
            raise CorruptStoreError(f"{path}: zarr group does not open ({exc})") from None
        meta = group.attrs.get("gist_index")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StoreNotFoundError(f"{path}: a zarr group, but not a gist_index store")
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path}: store format version {meta.get('format_version')}, this gist_index reads {FORMAT_VERSION}"
            )
        store = cls(path, group)
        if not allow_incomplete and meta.get("state") != "complete":
            raise IncompleteStoreError(
                f"{path}: the build has not finished (state {meta.get('state')!r}); re-run the same build command "
                "to resume it, or run `gist-index verify` for details"
            )
        return store

    def check_config(self, config: dict) -> None:
        """Raise ConfigMismatchError, showing every difference, if ``config`` is not the store's."""
        if self.meta["config_hash"] != config_hash(config):
            raise ConfigMismatchError(
                f"{self.path}: built with another configuration",
                diff_configs(self.meta["config"], config),
                "use --overwrite to rebuild, or run with the store's settings",
            )

    def set_meta(self, **updates) -> None:
        """Update the store's metadata (written to the group's attributes)."""
        self._set_meta(**updates)

    def _set_meta(self, **updates) -> None:
        self.meta.update(updates)
        self.group.attrs["gist_index"] = self.meta
        fsync_dir(self.path)

    # -- geometry -----------------------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        """Number of pool examples (rows)."""
        return int(self.meta["n_rows"])

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk (the unit of work, of resume and of the manifest)."""
        return int(self.meta["chunk_rows"])

    @property
    def n_chunks(self) -> int:
        """Number of row chunks."""
        return -(-self.n_rows // self.chunk_rows)

    @property
    def dim(self) -> int:
        """Stored vector dimension."""
        return int(self.meta["dim"])

    @property
    def n_checkpoints(self) -> int:
        """Number of adapter checkpoints."""
        return int(self.meta["n_checkpoints"])

    def chunk_range(self, i: int) -> tuple[int, int]:
        """Rows [start, stop) of chunk ``i``."""
        return i * self.chunk_rows, min(self.n_rows, (i + 1) * self.chunk_rows)

    # -- the pca projection's basis ------------------------------------------------------------------------
    def write_pca_basis(self, basis: np.ndarray, info: dict) -> None:
        """Store the fitted pca basis ([inner_dim, rank] float32), then record its digest and ``info`` in the
        metadata (a basis without its metadata entry counts as absent and is fitted again)."""
        from .project import basis_digest

        basis = np.ascontiguousarray(basis, np.float32)
        arr = self.group.create_array(
            "pca_basis",
            shape=basis.shape,
            chunks=(min(len(basis), 4096), basis.shape[1]),
            dtype="float32",
            compressors=[Crc32cCodec()],
            overwrite=True,
        )
        arr[:] = basis
        self._set_meta(pca={**info, "rank": int(basis.shape[1]), "digest": basis_digest(basis)})

    def pca_basis(self) -> np.ndarray | None:
        """The pca basis, checked against its digest; None when none has been fitted."""
        from .project import basis_digest

        info = self.meta.get("pca")
        if info is None:
            return None
        if "pca_basis" not in self.group:
            raise CorruptStoreError(f"{self.path}: the pca basis (array pca_basis) is missing")
        basis = np.asarray(self.group["pca_basis"][:], np.float32)
        if basis_digest(basis) != info["digest"]:
            raise CorruptStoreError(f"{self.path}: the pca basis does not match its digest {info['digest']}")
        return basis

    # -- the row arrays (pre-pass) ------------------------------------------------------------------------
    def _arrays(self) -> list[str]:
        names = list(ROW_ARRAYS) + list(CHUNK_ARRAYS)
        for c in range(self.n_checkpoints):
            names += [f"ckpt_{c}/vectors"] + [f"ckpt_{c}/{k}" for k in CKPT_ARRAYS]
        return names

    def ensure_arrays(self) -> None:
        """Create every array, with no rows yet, unless they exist."""
        if "ids" in self.group:
            return
        R = self.chunk_rows
        small = {"compressors": [ZstdCodec(level=3), Crc32cCodec()]}
        for name, dt in {**ROW_ARRAYS, **CHUNK_ARRAYS}.items():
            self.group.create_array(name, shape=(0,), chunks=(R,), dtype=dt, **small)
        for c in range(self.n_checkpoints):
            self.group.create_array(
                f"ckpt_{c}/vectors",
                shape=(0, self.dim),
                chunks=(R, self.dim),
                dtype=self.meta["dtype"],
                serializer=BytesCodec(),
                compressors=[Crc32cCodec()],
            )
            for k, dt in CKPT_ARRAYS.items():
                self.group.create_array(f"ckpt_{c}/{k}", shape=(0,), chunks=(R,), dtype=dt, **small)

    def resize(self, n_rows: int) -> None:
        """Grow or shrink every array to ``n_rows`` rows."""
        self.ensure_arrays()
        for name in self._arrays():
            arr = self.group[name]
            arr.resize((n_rows,) + tuple(arr.shape[1:]))
        self._set_meta(n_rows=int(n_rows))

    def write_rows(self, start: int, columns: dict[str, np.ndarray]) -> None:
        """Write pre-pass columns (ids, id_hash, source, line, n_chars) for rows ``start ..``."""
        with zarr.config.set({"array.write_empty_chunks": True}):
            for name, values in columns.items():
                self.group[name][start : start + len(values)] = values

    # -- chunks and the manifest --------------------------------------------------------------------------
    def _manifest_path(self, i: int) -> str:
        return os.path.join(self.path, "manifest", f"chunk-{i:08d}.json")

    def chunk_files(self, i: int) -> list[str]:
        """Paths (relative to the store) of every file holding chunk ``i``'s data."""
        out = []
        for name in self._arrays():
            key = f"c/{i}/0" if name.endswith("/vectors") else f"c/{i}"
            out.append(f"{name}/{key}")
        return out

    def write_chunk(self, i: int, columns: dict[str, np.ndarray]) -> None:
        """Write chunk ``i``'s computed columns, make them durable, then record the chunk in the manifest."""
        start, stop = self.chunk_range(i)
        with zarr.config.set({"array.write_empty_chunks": True}):
            for name, values in columns.items():
                if len(values) != stop - start:
                    raise StoreError(f"chunk {i}: column {name} has {len(values)} rows, expected {stop - start}")
                self.group[name][start:stop] = values
        files = {}
        for rel in self.chunk_files(i):
            full = os.path.join(self.path, rel)
            if not os.path.isfile(full):
                raise StoreError(f"chunk {i}: {rel} was not written")
            with open(full, "rb") as fh:
                os.fsync(fh.fileno())
            fsync_dir(os.path.dirname(full))
            files[rel] = sha256_file(full)
        entry = {"chunk": i, "rows": [start, stop], "config_hash": self.meta["config_hash"], "files": files}
        atomic_write_json(self._manifest_path(i), entry)

    def chunk_entry(self, i: int) -> dict | None:
        """The manifest entry of chunk ``i``, or None if the chunk is not complete."""
        try:
            with open(self._manifest_path(i)) as fh:
                entry = json.load(fh)
        except (OSError, json.JSONDecodeError):
            return None
        start, stop = self.chunk_range(i)
        if entry.get("rows") != [start, stop] or entry.get("config_hash") != self.meta["config_hash"]:
            return None
        return entry

    def done_chunks(self) -> set[int]:
        """Indices of the chunks the manifest records as complete."""
        return {i for i in range(self.n_chunks) if self.chunk_entry(i) is not None}

    def invalidate_chunk(self, i: int) -> None:
        """Forget chunk ``i`` (used when appending rows to a partial last chunk)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._manifest_path(i))

    def mark_rows_done(self, info: dict) -> None:
        """Record that the pre-pass finished (with what it found)."""
        atomic_write_json(os.path.join(self.path, "manifest", "rows.json"), {**info, "n_rows": self.n_rows})

    def rows_done(self) -> dict | None:
        """The pre-pass record, or None."""
        try:
            with open(os.path.join(self.path, "manifest", "rows.json")) as fh:
                info = json.load(fh)
        except (OSError, json.JSONDecodeError):
            return None
        return info if info.get("n_rows") == self.n_rows else None

    def finalize(self, summary: dict) -> None:
        """Mark the store complete (after every chunk and the index are durable)."""
        index_file = os.path.join(self.path, "faiss", "index.faiss")
        if os.path.isfile(index_file):
            summary = {**summary, "index_sha256": sha256_file(index_file)}
        self._set_meta(state="complete", summary=summary)

    def mark_building(self) -> None:
        """Put the store back into state ``building`` (before appending)."""
        self._set_meta(state="building")

    # -- reading ------------------------------------------------------------------------------------------
    def column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Read a 1-D column (or rows of it)."""
        return np.asarray(self.group[name][start : self.n_rows if stop is None else stop])

    def vectors(self, ckpt: int, start: int, stop: int, dtype=np.float32) -> np.ndarray:
        """Unit vectors of rows [start, stop) at checkpoint ``ckpt`` as ``dtype`` (None: as stored, which for an
        int8 store is each row scaled to a largest coordinate of +-127).

        A whole chunk is read straight from its file (see :meth:`_read_chunk`). numpy converts float16 at about
        1 GB/s, slower than a read: the exact scan asks for the stored type and lets torch convert it."""
        name = f"ckpt_{ckpt}/vectors"
        a = None
        if start % self.chunk_rows == 0 and stop == min(self.n_rows, start + self.chunk_rows):
            a = self._read_chunk(name, start // self.chunk_rows, stop - start)
        if a is None:
            a = self.group[name][start:stop]
        return np.asarray(a) if dtype is None else unit_rows(np.asarray(a), dtype)

    def _plain_dtype(self, name: str) -> np.dtype | None:
        """The dtype of a [rows, dim] array whose chunk files hold the raw little-endian values and a CRC32C
        (the layout :meth:`ensure_arrays` gives vectors), else None."""
        cache = self.__dict__.setdefault("_plain", {})
        if name not in cache:
            cache[name] = None
            with contextlib.suppress(Exception):
                meta = self.group[name].metadata
                codecs = list(meta.codecs)
                if (
                    len(codecs) == 2
                    and isinstance(codecs[0], BytesCodec)
                    and getattr(codecs[0].endian, "value", codecs[0].endian) in ("little", None)  # None: 1 byte
                    and isinstance(codecs[1], Crc32cCodec)
                    and getattr(meta.chunk_key_encoding, "separator", None) == "/"
                    and meta.chunk_key_encoding.name == "default"
                    and tuple(meta.chunk_grid.chunk_shape) == (self.chunk_rows, self.dim)
                ):
                    cache[name] = np.dtype(self.group[name].dtype).newbyteorder("<")
        return cache[name]

    def _read_chunk(self, name: str, i: int, rows: int) -> np.ndarray | None:
        """The first ``rows`` rows of chunk ``i`` of array ``name``, read from its file with one large read and
        checked against its CRC32C; None when the array has another layout or the file is absent (then zarr
        reads it). Through zarr the same read costs several times more CPU (event loop, two copies)."""
        dtype = self._plain_dtype(name)
        if dtype is None:
            return None
        path = self._chunk_file(name, i)
        size = self.chunk_rows * self.dim * dtype.itemsize
        buf = np.empty(size + 4, np.uint8)
        try:
            with open(path, "rb", buffering=0) as fh:
                got = 0
                while got < len(buf):
                    k = fh.readinto(memoryview(buf)[got:])
                    if not k:
                        break
                    got += k
                extra = fh.read(1)
        except FileNotFoundError:
            return None
        if got != len(buf) or extra:
            raise CorruptStoreError(f"{path}: {os.path.getsize(path)} bytes, a chunk of {name} has {size + 4}")
        if google_crc32c.value(buf[:size]) != int.from_bytes(buf[size:].tobytes(), "little"):
            raise CorruptStoreError(f"{path}: chunk {i} of {name} does not match its CRC32C checksum")
        return buf[:size].view(dtype).reshape(self.chunk_rows, self.dim)[:rows]

    def _chunk_file(self, name: str, i: int) -> str:
        """The file of chunk ``i`` of the [rows, dim] array ``name`` (zarr's default chunk key encoding)."""
        return os.path.join(self.path, name, "c", str(i), "0")

    def _will_need(self, i: int) -> None:
        """Ask the kernel to start reading chunk ``i``'s vector files now (``posix_fadvise(WILLNEED)``): the disk
        fills the page cache while earlier chunks are scored, and the later read is a copy from memory."""
        if not hasattr(os, "posix_fadvise"):
            return
        for c in range(self.n_checkpoints):
            with contextlib.suppress(OSError):
                fd = os.open(self._chunk_file(f"ckpt_{c}/vectors", i), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)

    def iter_chunks(
        self, chunks: Sequence[int] | None = None, dtype=np.float32
    ) -> Iterator[tuple[int, int, list[np.ndarray], np.ndarray]]:
        """Yield (start, stop, [vectors per checkpoint as ``dtype``, None: as stored], valid mask) per chunk.

        A missing chunk file (which zarr would read as zeros) or a checksum error is a CorruptStoreError.
        """
        block = 64  # the status column is read 64 chunks at a time (a zarr read per chunk costs more than it)
        status, first = None, -1
        order = list(range(self.n_chunks) if chunks is None else chunks)
        itemsize = np.dtype(self.group["ckpt_0/vectors"].dtype).itemsize if self.n_checkpoints else 2
        ahead = max(2, READAHEAD_BYTES // max(1, self.chunk_rows * self.dim * itemsize * self.n_checkpoints))
        for j in range(min(ahead, len(order))):
            self._will_need(order[j])
        for j, i in enumerate(order):
            if j + ahead < len(order):
                self._will_need(order[j + ahead])
            start, stop = self.chunk_range(i)
            for name in [f"ckpt_{c}/vectors/c/{i}/0" for c in range(self.n_checkpoints)] + [f"status/c/{i}"]:
                if not os.path.isfile(os.path.join(self.path, name)):
                    raise CorruptStoreError(f"{self.path}: {name} is missing; run `gist-index verify {self.path}`")
            try:
                if i // block != first:
                    first = i // block
                    rows = (first * block * self.chunk_rows, (first + 1) * block * self.chunk_rows)
                    status = self.column("status", *rows)
                vecs = [self.vectors(c, start, stop, dtype) for c in range(self.n_checkpoints)]
            except CorruptStoreError:
                raise
            except ValueError as exc:  # zarr's checksum error
                raise CorruptStoreError(
                    f"{self.path}: chunk {i} is corrupt ({exc}); run `gist-index verify {self.path}`"
                ) from None
            offset = start - first * block * self.chunk_rows
            yield start, stop, vecs, status[offset : offset + stop - start] == STATUS_OK

    def disk_bytes(self) -> int:
        """Bytes on disk of the whole store."""
        total = 0
        for root, _, files in os.walk(self.path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total

    @staticmethod
    def remove(path: str) -> None:
        """Delete a store directory (``--overwrite``); refuses a directory that is not a store."""
        if not os.path.exists(path):
            return
        zj = os.path.join(path, "zarr.json")
        if not os.path.isfile(zj) or FORMAT not in open(zj).read():
            raise StoreError(f"{path}: exists and is not a gist_index store; not removing it")
        shutil.rmtree(path)

    # -- verification -------------------------------------------------------------------------------------
    def verify(self, progress: bool = False) -> list[str]:
        """Check every chunk against the manifest and the metadata against the arrays; return the problems."""
        from .progress import bar as progress_bar

        problems: list[str] = []
        if self.meta.get("state") != "complete":
            problems.append(f"unfinished build: state is {self.meta.get('state')!r}, not 'complete'")
        if self.rows_done() is None:
            problems.append("the pre-pass over the pool (ids, sources) did not finish")
        for name in self._arrays():
            if name not in self.group:
                problems.append(f"array {name} is missing")
                continue
            shape = self.group[name].shape
            want = (self.n_rows, self.dim) if name.endswith("/vectors") else (self.n_rows,)
            if tuple(shape) != want:
                problems.append(f"array {name} has shape {tuple(shape)}, metadata says {want}")
        if problems and any("missing" in p or "shape" in p for p in problems):
            return problems
        missing = []
        for i in progress_bar(range(self.n_chunks), desc="verify", enabled=progress):
            entry = self.chunk_entry(i)
            if entry is None:
                missing.append(i)
                continue
            for rel, digest in sorted(entry["files"].items()):
                full = os.path.join(self.path, rel)
                if not os.path.isfile(full):
                    problems.append(f"chunk {i}: file {rel} is missing")
                elif sha256_file(full) != digest:
                    problems.append(
                        f"chunk {i}: file {rel} does not match its checksum ({os.path.getsize(full)} bytes)"
                    )
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            problems.append(f"{len(missing)} of {self.n_chunks} chunks are not complete: {shown}")
        if not problems:
            status = self.column("status")
            if not np.isin(status, (STATUS_OK, STATUS_TRUNCATED)).all():
                problems.append("column status holds values other than 0 and 1")
            summary = self.meta.get("summary", {})
            if summary.get("n_with_gradient") not in (None, int((status == STATUS_OK).sum())):
                problems.append("the summary's count of examples with a gradient does not match the status column")
        if self.meta.get("config", {}).get("projection", {}).get("kind") == "pca":
            try:
                if self.pca_basis() is None:
                    problems.append("the pca basis has not been fitted")
            except CorruptStoreError as exc:
                problems.append(str(exc).split(": ", 1)[1])
        digest = self.meta.get("summary", {}).get("index_sha256")
        index_file = os.path.join(self.path, "faiss", "index.faiss")
        if digest and (not os.path.isfile(index_file) or sha256_file(index_file) != digest):
            problems.append("faiss/index.faiss is missing or does not match its checksum")
        return problems
