"""Identity gallery: enrolled people's face embeddings in SQLite, open-set matching by cosine similarity.

Why SQLite: one file, transactional (an enrolment is all-or-nothing even if the process dies
mid-way), readable by the node's service and processing threads at once, and in the standard
library.  Biometric data is sensitive, so the file is created ``0600`` (and an existing file with
looser permissions is tightened, with a warning), a parent folder we create is ``0700``, and face
images are stored only when ``store_images=True``.

Matching: every embedding is L2-normalised.  ``match_mode="mean"`` (default) compares with each
person's normalised mean embedding (robust to one bad sample, cost independent of the number of
samples); ``"max"`` takes the best cosine similarity over all of a person's samples (better when
a person was enrolled under very different conditions).  The best person wins if the similarity
is at least ``threshold``; otherwise the answer is ``"unknown"``.  The confidence returned is
that best cosine similarity clipped to ``[0, 1]`` (0 for an empty gallery), also for ``"unknown"``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from facial_perception.core.evaluation import DEFAULT_IDENTITY_THRESHOLD

__all__ = ["DEFAULT_IDENTITY_THRESHOLD", "UNKNOWN", "GalleryError", "IdentityGallery"]

UNKNOWN = "unknown"
_FORMAT = "facial_perception.gallery"
_VERSION = "1"
_MAX_NAME = 128
# meta key: hash of the model weights behind the stored embeddings (ProgressiveNet.embedding_fingerprint)
_FINGERPRINT = "embedding_fingerprint"
_LOG = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS persons (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    person INTEGER NOT NULL REFERENCES persons(id) ON DELETE CASCADE,
    vector BLOB NOT NULL,
    dim INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS embeddings_person ON embeddings(person);
"""
_IMAGES_SCHEMA = """
CREATE TABLE IF NOT EXISTS face_images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    person INTEGER NOT NULL REFERENCES persons(id) ON DELETE CASCADE,
    image BLOB NOT NULL,
    format TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class GalleryError(RuntimeError):
    """The gallery cannot do what was asked (corrupt file, bad name, dimension mismatch); one line."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _secure_file(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it; tighten an existing one (with a warning)."""
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, mode=0o700)
            os.chmod(parent, 0o700)
        except OSError as exc:
            raise GalleryError(f"cannot create gallery folder {parent}: {_first_line(exc)}") from None
    if path.exists() and not path.is_file():
        raise GalleryError(f"gallery path {path} exists and is not a regular file")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            try:
                os.chmod(path, 0o600)
            except OSError as exc:
                raise GalleryError(
                    f"gallery {path} has mode {mode:o} and chmod 600 failed: {_first_line(exc)}"
                ) from None
            warnings.warn(f"identity gallery {path} had permissions {mode:o}; tightened to 600", stacklevel=3)
        return
    except OSError as exc:
        raise GalleryError(f"cannot create gallery {path}: {_first_line(exc)}") from None
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _normalise_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


class IdentityGallery:
    """Enrolled identities in one SQLite file; safe to share between threads."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        threshold: float = DEFAULT_IDENTITY_THRESHOLD,
        store_images: bool = False,
        match_mode: str = "mean",
    ) -> None:
        if not -1.0 <= float(threshold) <= 1.0:
            raise GalleryError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
        if match_mode not in ("mean", "max"):
            raise GalleryError(f"match_mode must be 'mean' or 'max', got {match_mode!r}")
        self.path = Path(path).expanduser()
        self.threshold = float(threshold)
        self.store_images = bool(store_images)
        self.match_mode = match_mode
        self._lock = threading.RLock()
        self._cache: tuple[list[str], np.ndarray, np.ndarray] | None = None
        self._cache_version: int | None = None  # PRAGMA data_version the cache was loaded at
        _secure_file(self.path)
        try:
            self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise GalleryError(f"cannot open gallery {self.path}: {_first_line(exc)}") from None
        try:
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise GalleryError(f"{self.path} is not a valid identity gallery: {_first_line(exc)}") from None
        except GalleryError:
            self._conn.close()
            raise

    # -- setup ---------------------------------------------------------------------------------
    def _init_schema(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "meta" not in tables:
            raise GalleryError(f"{self.path} is an SQLite database but not an identity gallery")
        if "meta" in tables:
            fmt = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if fmt is None or fmt[0] != _FORMAT:
                raise GalleryError(f"{self.path} is an SQLite database but not an identity gallery")
            version = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            if version is None or version[0] != _VERSION:
                raise GalleryError(f"{self.path}: unsupported gallery version {version and version[0]!r}")
        with self._transaction():
            for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                conn.execute(statement)
            if self.store_images:
                conn.execute(_IMAGES_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (_FORMAT,))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('version', ?)", (_VERSION,))
        # An integrity problem deeper in the file would otherwise surface only on a later query.
        check = conn.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise GalleryError(f"{self.path} is corrupt: {check[0] if check else 'quick_check failed'}")

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)

    # -- queries -------------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        """Embedding dimension of the gallery (None while empty)."""
        with self._lock:
            row = self._execute("SELECT dim FROM embeddings LIMIT 1").fetchone()
            return int(row[0]) if row else None

    @property
    def fingerprint(self) -> str | None:
        """Hash of the model that made the stored embeddings (None: empty, or enrolled before galleries
        kept one)."""
        with self._lock:
            row = self._execute("SELECT value FROM meta WHERE key = ?", (_FINGERPRINT,)).fetchone()
            return row[0] if row else None

    def check_model(self, dim: int | None, fingerprint: str | None) -> None:
        """Raise one clear :class:`GalleryError` if the stored embeddings come from another model than
        the one that makes ``dim``-d embeddings with weights hashed to ``fingerprint``.

        Another model's embeddings would not fail loudly: they would name the wrong people. An empty
        gallery fits any model; a gallery enrolled before fingerprints were kept is checked by length.
        """
        stored_dim, stored = self.dim, self.fingerprint
        fix = "enrol the people again in a new gallery (move the file away or set another gallery path)"
        if dim is not None and stored_dim is not None and stored_dim != dim:
            raise GalleryError(
                f"gallery {self.path} holds {stored_dim}-d embeddings of another model, this model makes "
                f"{dim}-d ones: {fix}"
            )
        if fingerprint is not None and stored is not None and stored != fingerprint:
            raise GalleryError(
                f"gallery {self.path} was enrolled with another model (embedding fingerprint {stored}, this "
                f"model's {fingerprint}): {fix}"
            )
        if stored_dim is not None and stored is None:
            _LOG.warning(
                "gallery %s was enrolled before galleries recorded their model: it cannot be checked"
                " against this one beyond the embedding length",
                self.path,
            )

    def _execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, params)
        except sqlite3.ProgrammingError as exc:
            raise GalleryError(f"gallery {self.path}: {_first_line(exc)}") from None
        except sqlite3.DatabaseError as exc:
            raise GalleryError(f"gallery {self.path} failed: {_first_line(exc)}") from None

    def names(self) -> list[str]:
        """Enrolled names, sorted."""
        with self._lock:
            return [row[0] for row in self._execute("SELECT name FROM persons ORDER BY name")]

    def counts(self) -> dict[str, int]:
        """Number of stored embeddings per enrolled name."""
        with self._lock:
            rows = self._execute(
                "SELECT p.name, COUNT(e.id) FROM persons p LEFT JOIN embeddings e ON e.person = p.id "
                "GROUP BY p.id ORDER BY p.name"
            )
            return {name: int(count) for name, count in rows}

    def image_count(self, name: str | None = None) -> int:
        """Stored face images (all, or of one person); 0 when images are not stored."""
        with self._lock:
            exists = self._execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'face_images'"
            ).fetchone()
            if not exists:
                return 0
            if name is None:
                return int(self._execute("SELECT COUNT(*) FROM face_images").fetchone()[0])
            return int(
                self._execute(
                    "SELECT COUNT(*) FROM face_images f JOIN persons p ON f.person = p.id WHERE p.name = ?",
                    (name,),
                ).fetchone()[0]
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._execute("SELECT COUNT(*) FROM persons").fetchone()[0])

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        with self._lock:
            return self._execute("SELECT 1 FROM persons WHERE name = ?", (name,)).fetchone() is not None

    # -- changes -------------------------------------------------------------------------------
    @staticmethod
    def _check_name(name: object) -> str:
        if not isinstance(name, str):
            raise GalleryError(f"name must be a string, got {type(name).__name__}")
        clean = name.strip()
        if not clean:
            raise GalleryError("name must not be empty")
        if len(clean) > _MAX_NAME:
            raise GalleryError(f"name is longer than {_MAX_NAME} characters")
        if any(not ch.isprintable() for ch in clean):
            raise GalleryError("name must not contain control characters")
        if clean.lower() == UNKNOWN:
            raise GalleryError(f"{UNKNOWN!r} is reserved for unrecognised faces")
        return clean

    def enrol(
        self,
        name: str,
        embeddings: np.ndarray,
        images: Sequence[np.ndarray] | None = None,
        fingerprint: str | None = None,
    ) -> int:
        """Add ``(K, D)`` embeddings (or one ``(D,)``) for ``name`` in one transaction.

        Adds to an existing person's samples.  ``images`` (RGB uint8 face crops) are stored only
        when the gallery was opened with ``store_images=True``; otherwise they are ignored.
        ``fingerprint``: the hash of the model that made the embeddings
        (``FacePredictor.embedding_fingerprint``); the first enrolment stores it and later ones must
        match it. Returns the person's total number of embeddings.
        """
        if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint.strip()):
            raise GalleryError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
        clean = self._check_name(name)
        matrix = np.asarray(embeddings, dtype=np.float32)
        if matrix.ndim == 1:
            matrix = matrix[None, :]
        if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
            raise GalleryError(f"embeddings must be a non-empty (K, D) array, got shape {matrix.shape}")
        if not np.all(np.isfinite(matrix)):
            raise GalleryError("embeddings contain NaN or infinity")
        norms = np.linalg.norm(matrix, axis=1)
        if np.any(norms < 1e-8):
            raise GalleryError("an embedding has zero length")
        matrix = (matrix / norms[:, None]).astype(np.float32)
        encoded_images: list[bytes] = []
        if self.store_images and images is not None:
            encoded_images = [_encode_png(img) for img in images]
        now = time.time()
        with self._lock:
            dim = self.dim
            if dim is not None and dim != matrix.shape[1]:
                raise GalleryError(
                    f"embedding dimension {matrix.shape[1]} does not match the gallery's {dim}"
                )
            stored = self.fingerprint
            if fingerprint is not None and stored is not None and stored != fingerprint:
                raise GalleryError(
                    f"gallery {self.path} was enrolled with another model (embedding fingerprint {stored},"
                    f" these embeddings' {fingerprint}): nothing enrolled"
                )
            try:
                with self._transaction():
                    conn = self._conn
                    if fingerprint is not None and dim is None:
                        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_FINGERPRINT, fingerprint))
                    conn.execute("INSERT OR IGNORE INTO persons (name, created) VALUES (?, ?)", (clean, now))
                    person = conn.execute("SELECT id FROM persons WHERE name = ?", (clean,)).fetchone()[0]
                    self._conn.executemany(
                        "INSERT INTO embeddings (person, vector, dim, created) VALUES (?, ?, ?, ?)",
                        [(person, row.tobytes(), matrix.shape[1], now) for row in matrix],
                    )
                    if encoded_images:
                        self._conn.executemany(
                            "INSERT INTO face_images (person, image, format, created) "
                            "VALUES (?, ?, 'png', ?)",
                            [(person, data, now) for data in encoded_images],
                        )
            except sqlite3.Error as exc:
                raise GalleryError(f"enrolment of {clean!r} failed: {_first_line(exc)}") from None
            self._cache = None
            return self.counts()[clean]

    def forget(self, name: str) -> bool:
        """Delete a person with all their embeddings (and images); False if the name is unknown."""
        if not isinstance(name, str):
            return False
        with self._lock:
            try:
                with self._transaction():
                    query = "SELECT id FROM persons WHERE name = ?"
                    row = self._conn.execute(query, (name.strip(),)).fetchone()
                    if row is None:
                        return False
                    self._conn.execute("DELETE FROM embeddings WHERE person = ?", (row[0],))
                    has_images = self._conn.execute(
                        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'face_images'"
                    ).fetchone()
                    if has_images:
                        self._conn.execute("DELETE FROM face_images WHERE person = ?", (row[0],))
                    self._conn.execute("DELETE FROM persons WHERE id = ?", (row[0],))
                    if self._conn.execute("SELECT 1 FROM embeddings LIMIT 1").fetchone() is None:
                        # empty again: the next enrolment may come from any model
                        self._conn.execute("DELETE FROM meta WHERE key = ?", (_FINGERPRINT,))
            except sqlite3.Error as exc:
                raise GalleryError(f"forgetting {name!r} failed: {_first_line(exc)}") from None
            self._cache = None
            return True

    # -- matching ------------------------------------------------------------------------------
    def _load(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(names, reference matrix (R, D), owner index per row), cached until the next change, by this
        connection or by another process (``facial-perception-gallery`` while the node runs)."""
        # SQLite's data_version changes when another connection has committed to the file
        version = self._execute("PRAGMA data_version").fetchone()[0]
        if version != self._cache_version:
            self._cache, self._cache_version = None, version
        if self._cache is not None:
            return self._cache
        rows = self._execute(
            "SELECT p.name, e.vector, e.dim FROM embeddings e JOIN persons p ON e.person = p.id "
            "ORDER BY p.name, e.id"
        ).fetchall()
        names: list[str] = []
        owners: list[int] = []
        vectors: list[np.ndarray] = []
        for name, blob, dim in rows:
            vec = np.frombuffer(blob, dtype=np.float32)
            if vec.size != dim:
                raise GalleryError(f"gallery {self.path} holds a damaged embedding for {name!r}")
            if not names or names[-1] != name:
                names.append(name)
            owners.append(len(names) - 1)
            vectors.append(vec)
        if not vectors:
            self._cache = ([], np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
            return self._cache
        samples = np.stack(vectors)
        owner_idx = np.asarray(owners, dtype=np.int64)
        if self.match_mode == "mean":
            means = np.zeros((len(names), samples.shape[1]), dtype=np.float64)
            np.add.at(means, owner_idx, samples)
            self._cache = (names, _normalise_rows(means).astype(np.float32), np.arange(len(names)))
        else:
            self._cache = (names, _normalise_rows(samples).astype(np.float32), owner_idx)
        return self._cache

    def match(self, embedding: np.ndarray) -> tuple[str, float] | list[tuple[str, float]]:
        """``(name or "unknown", confidence)`` for one ``(D,)`` embedding, or a list for ``(N, D)``."""
        query = np.asarray(embedding, dtype=np.float32)
        single = query.ndim == 1
        queries = query[None, :] if single else query
        if queries.ndim != 2 or queries.shape[1] == 0:
            raise GalleryError(f"embedding must be (D,) or (N, D), got shape {query.shape}")
        if not np.all(np.isfinite(queries)):
            raise GalleryError("embedding contains NaN or infinity")
        with self._lock:
            names, refs, owners = self._load()
        if not names:
            results = [(UNKNOWN, 0.0)] * queries.shape[0]
            return results[0] if single else results
        if refs.shape[1] != queries.shape[1]:
            raise GalleryError(
                f"embedding dimension {queries.shape[1]} does not match the gallery's {refs.shape[1]}"
            )
        sims = _normalise_rows(queries.astype(np.float64)) @ refs.T.astype(np.float64)  # (N, R)
        per_person = np.full((queries.shape[0], len(names)), -np.inf)
        np.maximum.at(per_person.T, owners, sims.T)
        best = per_person.argmax(axis=1)
        results = []
        for i, idx in enumerate(best):
            score = float(per_person[i, idx])
            name = names[idx] if score >= self.threshold else UNKNOWN
            results.append((name, float(np.clip(score, 0.0, 1.0))))
        return results[0] if single else results

    def reload(self) -> None:
        """Drop the in-memory cache (when another process changed the file)."""
        with self._lock:
            self._cache = None

    def close(self) -> None:
        """Close the database (checkpointing the WAL into the main file)."""
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.Error as exc:
                _LOG.warning("closing gallery %s: %s", self.path, _first_line(exc))

    def __enter__(self) -> IdentityGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` / ``ROLLBACK`` on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        else:
            self._conn.execute("ROLLBACK")


def _encode_png(image: np.ndarray) -> bytes:
    import cv2

    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or img.size == 0:
        raise GalleryError(f"face images must be non-empty uint8 arrays, got {img.dtype} {img.shape}")
    if img.ndim == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", img)
    if not ok:
        raise GalleryError("could not encode a face image as PNG")
    return data.tobytes()
