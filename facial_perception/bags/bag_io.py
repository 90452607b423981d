"""Reading and writing ROS 2 bags without rosbag2: typestore, atomic writer, validating reader.

``ros2 bag`` is not always available (CI machines, laptops, training servers), so bags are read and
written with the pure-Python ``rosbags`` library.  The package's own messages (ground truth, face
arrays) are registered from the ``msg/*.msg`` files, so the type hashes stored in a bag match those
of the rosidl build and a robot's ``ros2 bag play`` accepts the bags made here.

Every problem with a bag -- a path that is not a bag, a wrong storage plugin, a truncated or
corrupt file, a missing topic, an unknown message type -- surfaces as one :class:`BagError` with a
one-line message, and nothing half-written is ever left behind by :class:`BagWriter`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sqlite3
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

__all__ = [
    "ATTRIBUTE_TRACK",
    "COMPRESSED_IMAGE_TYPE",
    "DEFAULT_COMPRESSED_TOPIC",
    "DEFAULT_IMAGE_TOPIC",
    "FACES_TOPIC",
    "FACE_ARRAY_TYPE",
    "GROUND_TRUTH_TOPIC",
    "GROUND_TRUTH_TYPE",
    "IMAGE_TYPE",
    "IMAGE_TYPES",
    "STORAGES",
    "BagError",
    "BagImage",
    "BagReader",
    "BagWriter",
    "GroundTruthFace",
    "GroundTruthFrame",
    "decode_bag_image",
    "find_msg_dir",
    "get_typestore",
    "make_header",
    "sniff_storage",
    "stamp_to_ns",
]

PACKAGE = "facial_perception"
STORAGES = ("sqlite3", "mcap")
IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)
GROUND_TRUTH_TYPE = f"{PACKAGE}/msg/GroundTruthArray"
FACE_ARRAY_TYPE = f"{PACKAGE}/msg/FaceArray"
CLOCK_TYPE = "rosgraph_msgs/msg/Clock"

DEFAULT_IMAGE_TOPIC = "/camera/image_raw"
DEFAULT_COMPRESSED_TOPIC = "/camera/image_raw/compressed"
GROUND_TRUTH_TOPIC = "/facial_perception/ground_truth"
FACES_TOPIC = "/facial_perception/faces"
#: Ground-truth attribute that carries the id of the pasted-face track (for id-switch counting);
#: it is bookkeeping, not a demographic attribute, so subgroup tables skip it.
ATTRIBUTE_TRACK = "gt_track"

_SQLITE_MAGIC = b"SQLite format 3\x00"
_MCAP_MAGIC = b"\x89MCAP"
_SUFFIX_STORAGE = {".db3": "sqlite3", ".mcap": "mcap"}
_STORAGE_SUFFIX = {"sqlite3": ".db3", "mcap": ".mcap"}


class BagError(Exception):
    """A bag cannot be read or written; the message names the bag and the problem in one line."""


# --------------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------------


def find_msg_dir() -> Path:
    """Folder with the package's ``*.msg`` files: the source checkout, else the installed share dir.

    The source checkout wins so that a developer editing a ``.msg`` file sees the change at once.
    """
    candidates = [Path(__file__).resolve().parents[2] / "msg"]
    prefixes = [sys.prefix, *filter(None, os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep))]
    candidates += [Path(p) / "share" / PACKAGE / "msg" for p in prefixes]
    for path in candidates:
        if (path / "GroundTruthArray.msg").is_file():
            return path
    raise BagError(f"cannot find the {PACKAGE} msg/*.msg files (looked in {', '.join(map(str, candidates))})")


@functools.lru_cache(maxsize=4)
def get_typestore(msg_dir: str | None = None) -> Any:
    """A rosbags ``Typestore`` with ROS 2 Kilted standard types plus the package's own messages.

    Kilted and Jazzy share the definitions of every standard type used here, so the hashes also
    match bags recorded on Jazzy.  Cached: building a store parses every definition once.
    """
    from rosbags.typesys import Stores, TypesysError, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    folder = Path(msg_dir) if msg_dir else find_msg_dir()
    types: dict[str, Any] = {}
    try:
        for path in sorted(folder.glob("*.msg")):
            types.update(get_types_from_msg(path.read_text(encoding="utf-8"), f"{PACKAGE}/msg/{path.stem}"))
        store.register(types)
    except (TypesysError, OSError) as exc:
        raise BagError(f"cannot register the {PACKAGE} messages from {folder}: {exc}") from None
    return store


def stamp_to_ns(stamp: Any) -> int:
    """``builtin_interfaces/Time`` (rosbags or rclpy object) -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def make_header(stamp_ns: int, frame_id: str = "camera") -> Any:
    """A rosbags ``std_msgs/Header`` for the given stamp."""
    store = get_typestore()
    time_cls = store.types["builtin_interfaces/msg/Time"]
    header_cls = store.types["std_msgs/msg/Header"]
    return header_cls(
        stamp=time_cls(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000), frame_id=frame_id
    )


# --------------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------------


@dataclass
class GroundTruthFace:
    """One labelled face: box ``(x0, y0, x1, y1)`` in pixels, task labels and dataset attributes."""

    box: tuple[float, float, float, float]
    labels: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def track(self) -> str | None:
        """Id of the pasted-face track this face belongs to (``None`` if the bag has none)."""
        return self.attributes.get(ATTRIBUTE_TRACK) or None

    def to_msg(self) -> Any:
        """The ``facial_perception/msg/GroundTruthFace`` rosbags object."""
        store = get_typestore()
        roi_cls = store.types["sensor_msgs/msg/RegionOfInterest"]
        face_cls = store.types[f"{PACKAGE}/msg/GroundTruthFace"]
        x0, y0, x1, y1 = (round(v) for v in self.box)
        return face_cls(
            roi=roi_cls(x_offset=x0, y_offset=y0, width=x1 - x0, height=y1 - y0, do_rectify=False),
            tasks=list(self.labels),
            labels=[self.labels[t] for t in self.labels],
            attribute_names=list(self.attributes),
            attribute_values=[self.attributes[a] for a in self.attributes],
        )

    @classmethod
    def from_msg(cls, msg: Any) -> GroundTruthFace:
        """Parse a deserialized message; parallel lists of unequal length are a corrupt bag."""
        if len(msg.tasks) != len(msg.labels) or len(msg.attribute_names) != len(msg.attribute_values):
            raise BagError("ground truth message has parallel lists of different lengths (tasks/labels)")
        roi = msg.roi
        box = (
            float(roi.x_offset),
            float(roi.y_offset),
            float(roi.x_offset + roi.width),
            float(roi.y_offset + roi.height),
        )
        return cls(
            box,
            dict(zip(msg.tasks, msg.labels, strict=True)),
            dict(zip(msg.attribute_names, msg.attribute_values, strict=True)),
        )


@dataclass
class GroundTruthFrame:
    """Ground truth of one image: its header stamp, labelled faces and the dataset files used."""

    stamp_ns: int
    faces: list[GroundTruthFace]
    source: str = ""

    def to_msg(self, frame_id: str = "camera") -> Any:
        """The ``facial_perception/msg/GroundTruthArray`` rosbags object."""
        cls = get_typestore().types[GROUND_TRUTH_TYPE]
        return cls(
            header=make_header(self.stamp_ns, frame_id),
            faces=[f.to_msg() for f in self.faces],
            source=self.source,
        )


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


class BagWriter:
    """Write a bag atomically: into a hidden temporary folder beside ``path``, renamed on success.

    Use as a context manager.  On any exception (including Ctrl-C) the temporary folder is deleted,
    so ``path`` either does not exist or is a complete bag.  An existing ``path`` is refused unless
    ``overwrite`` is set; then it is replaced only once the new bag is complete.
    """

    def __init__(self, path: str | os.PathLike[str], storage: str = "sqlite3", *, overwrite: bool = False):
        if storage not in STORAGES:
            raise BagError(f"unknown storage {storage!r} (choose {' or '.join(STORAGES)})")
        self.path = Path(path)
        self.storage = storage
        self.overwrite = overwrite
        if self.path.exists() and not overwrite:
            raise BagError(f"{self.path} exists already (choose another output or pass --overwrite)")
        self._tmpdir: Path | None = None
        self._writer: Any = None
        self._connections: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def __enter__(self) -> BagWriter:
        from rosbags.rosbag2 import StoragePlugin, Writer, WriterError

        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial", dir=parent))
        except OSError as exc:
            raise BagError(f"cannot create the output folder {parent}: {exc.strerror or exc}") from None
        plugin = StoragePlugin.SQLITE3 if self.storage == "sqlite3" else StoragePlugin.MCAP
        try:
            self._writer = Writer(self._tmpdir / self.path.name, version=9, storage_plugin=plugin)
            self._writer.open()
        except (WriterError, OSError) as exc:
            self._cleanup()
            raise BagError(f"cannot create bag {self.path}: {exc}") from None
        return self

    def add_topic(self, topic: str, msgtype: str) -> None:
        """Declare a topic (once) with a type known to :func:`get_typestore`."""
        from rosbags.rosbag2 import WriterError

        if topic in self._connections:
            return
        store = get_typestore()
        if msgtype not in store.types:
            raise BagError(f"cannot write topic {topic}: unknown message type {msgtype}")
        try:
            self._connections[topic] = self._writer.add_connection(topic, msgtype, typestore=store)
        except WriterError as exc:
            raise BagError(f"cannot add topic {topic} to {self.path}: {exc}") from None
        self.counts[topic] = 0

    def set_custom_data(self, key: str, value: str) -> None:
        """Store a string in the bag's ``metadata.yaml`` ``custom_data`` (how the bag was made)."""
        self._writer.set_custom_data(key, value)

    def write(self, topic: str, timestamp_ns: int, msg: Any) -> None:
        """Serialize a rosbags message object and write it at ``timestamp_ns`` (receive time)."""
        self.add_topic(topic, msg.__msgtype__)
        data = get_typestore().serialize_cdr(msg, msg.__msgtype__)
        self.write_raw(topic, timestamp_ns, data)

    def write_raw(
        self, topic: str, timestamp_ns: int, data: bytes | memoryview, msgtype: str | None = None
    ) -> None:
        """Write already serialized CDR bytes (replayed or received messages are never re-encoded)."""
        if topic not in self._connections:
            if msgtype is None:
                raise BagError(f"topic {topic} was not declared before writing raw data")
            self.add_topic(topic, msgtype)
        try:
            self._writer.write(self._connections[topic], int(timestamp_ns), data)
        except OSError as exc:
            raise BagError(f"cannot write to {self.path}: {exc.strerror or exc}") from None
        self.counts[topic] += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            with contextlib.suppress(Exception):
                self._writer.abort()
            self._cleanup()
            return
        try:
            self._writer.close()
            staged = self._tmpdir / self.path.name  # type: ignore[operator]
            if self.path.exists():
                old = self.path.with_name(f".{self.path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.path, old)
                os.replace(staged, self.path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staged, self.path)
        except Exception as err:
            self._cleanup()
            raise BagError(f"cannot finish bag {self.path}: {err}") from None
        self._cleanup()

    def _cleanup(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


# --------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------


def sniff_storage(path: Path) -> str | None:
    """``"sqlite3"`` or ``"mcap"`` from a file's magic bytes, ``None`` for anything else."""
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head.startswith(_SQLITE_MAGIC):
        return "sqlite3"
    if head.startswith(_MCAP_MAGIC):
        return "mcap"
    return None


@dataclass
class BagImage:
    """One image message as stored: log time, header stamp, type and the raw CDR bytes."""

    log_time_ns: int
    stamp_ns: int
    msgtype: str
    raw: bytes
    message: Any  # the deserialized rosbags object (its data is a view of ``raw``)


#: Errors of the storage back-ends that mean "this file is damaged" once the bag has been validated.
def _storage_errors() -> tuple[type[BaseException], ...]:
    from rosbags.rosbag2 import ReaderError

    errors: list[type[BaseException]] = [
        ReaderError,
        sqlite3.DatabaseError,
        struct.error,
        EOFError,
        ValueError,
        KeyError,
        IndexError,
        AssertionError,
    ]
    with contextlib.suppress(ImportError):
        import apsw

        errors.append(apsw.Error)
    return tuple(errors)


class BagReader:
    """A validated ROS 2 bag (directory with ``metadata.yaml``, or a single ``.db3``/``.mcap`` file).

    ``storage`` (optional) is the plugin the caller expects; a bag of another storage is refused.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str], storage: str | None = None):
        self.path = Path(path)
        if storage is not None and storage not in STORAGES:
            raise BagError(f"unknown storage {storage!r} (choose {' or '.join(STORAGES)})")
        target, self.storage = self._locate(storage)
        from rosbags.rosbag2 import Reader

        self._reader: Any = None
        try:
            reader = Reader(target)
            reader.open()
        except FileNotFoundError as exc:
            raise BagError(f"{self.path}: {exc}") from None
        except _storage_errors() as exc:
            raise BagError(f"{self.path}: corrupt or truncated bag ({_one_line(exc)})") from None
        except OSError as exc:
            raise BagError(f"{self.path}: cannot read bag ({exc.strerror or exc})") from None
        self._reader = reader
        self._register_bag_types()

    # ---- validation -----------------------------------------------------------------------------
    def _locate(self, expected: str | None) -> tuple[Path, str]:
        """The path rosbags should open and the storage plugin, checked against the files' magic."""
        path = self.path
        if not path.exists():
            raise BagError(f"{path}: no such file or directory")
        if path.is_dir():
            meta = path / "metadata.yaml"
            files = sorted(p for p in path.iterdir() if p.suffix in _SUFFIX_STORAGE)
            if not meta.is_file():
                if len(files) == 1:  # a recorder that died before writing metadata.yaml
                    return self._check_file(files[0], expected), _SUFFIX_STORAGE[files[0].suffix]
                raise BagError(f"{path}: not a ROS 2 bag (no metadata.yaml and no single .db3/.mcap file)")
            declared = _declared_storage(meta)
            if declared not in STORAGES:
                raise BagError(
                    f"{path}: storage plugin {declared!r} in metadata.yaml is not supported "
                    f"(supported: {', '.join(STORAGES)})"
                )
            for file in files:
                actual = sniff_storage(file)
                if actual is None:
                    raise BagError(f"{file}: corrupt bag file (neither a sqlite3 database nor an mcap file)")
                if actual != declared:
                    raise BagError(
                        f"{path}: wrong storage plugin: metadata.yaml says {declared!r} "
                        f"but {file.name} is a {actual} file"
                    )
            if expected is not None and expected != declared:
                raise BagError(f"{path}: bag uses storage {declared!r}, not {expected!r}")
            return path, declared
        storage = self._check_file(path, expected)
        return path, storage

    @staticmethod
    def _check_file(path: Path, expected: str | None) -> str:
        actual = sniff_storage(path)
        if actual is None:
            raise BagError(f"{path}: not a ROS 2 bag (neither a sqlite3 .db3 nor an mcap file)")
        claimed = _SUFFIX_STORAGE.get(path.suffix)
        if claimed is None:
            raise BagError(
                f"{path}: a {actual} file needs the suffix {_STORAGE_SUFFIX[actual]} to be read as a bag"
            )
        if claimed != actual:
            raise BagError(f"{path}: wrong storage plugin: the name says {claimed} but the file is {actual}")
        if expected is not None and expected != actual:
            raise BagError(f"{path}: bag uses storage {actual!r}, not {expected!r}")
        return actual

    def _register_bag_types(self) -> None:
        """Teach the typestore types that only the bag defines (e.g. a robot's custom camera msgs)."""
        from rosbags.typesys import TypesysError, get_types_from_msg

        store = get_typestore()
        for conn in self._reader.connections:
            if conn.msgtype in store.types or not conn.msgdef.data:
                continue
            with contextlib.suppress(TypesysError, ValueError, KeyError):
                if conn.msgdef.format.name == "MSG":
                    store.register(get_types_from_msg(conn.msgdef.data, conn.msgtype))

    # ---- metadata ----------------------------------------------------------------------------------
    @property
    def topics(self) -> dict[str, str]:
        """Topic name -> message type."""
        return {c.topic: c.msgtype for c in self._reader.connections}

    def message_count(self, topic: str) -> int:
        """Number of messages on ``topic`` (0 for an unknown topic)."""
        return sum(c.msgcount for c in self._reader.connections if c.topic == topic)

    @property
    def custom_data(self) -> dict[str, str]:
        """``custom_data`` of ``metadata.yaml`` (empty for single-file bags)."""
        metadata = getattr(self._reader.storage, "metadata", None)
        return dict(getattr(metadata, "custom", None) or {})

    @property
    def duration_s(self) -> float:
        """Time between the first and the last message, seconds."""
        return self._reader.duration / 1e9 if self._reader.message_count else 0.0

    @property
    def start_time_ns(self) -> int:
        """Log time of the first message."""
        return int(self._reader.start_time)

    def image_topic(self, topic: str | None = None) -> str:
        """The image topic to evaluate: ``topic`` if given (checked), else auto-detected.

        Auto-detection prefers :data:`DEFAULT_IMAGE_TOPIC` / :data:`DEFAULT_COMPRESSED_TOPIC`,
        then the image topic with most messages; several equally plausible topics are an error
        that lists them, so the user picks one with ``--topic``.
        """
        topics = self.topics
        if topic is not None:
            if topic not in topics:
                raise BagError(f"{self.path}: topic {topic} not in the bag (topics: {_list(topics)})")
            if topics[topic] not in IMAGE_TYPES:
                raise BagError(
                    f"{self.path}: topic {topic} has type {topics[topic]}, not an image type "
                    f"({' or '.join(IMAGE_TYPES)})"
                )
            return topic
        images = [t for t, typ in topics.items() if typ in IMAGE_TYPES]
        if not images:
            raise BagError(
                f"{self.path}: no sensor_msgs/Image or CompressedImage topic (topics: {_list(topics)})"
            )
        for preferred in (DEFAULT_IMAGE_TOPIC, DEFAULT_COMPRESSED_TOPIC):
            if preferred in images:
                return preferred
        counts = {t: self.message_count(t) for t in images}
        best = max(counts.values())
        top = [t for t in images if counts[t] == best]
        if len(top) > 1:
            raise BagError(
                f"{self.path}: several image topics ({', '.join(sorted(top))}); choose one with --topic"
            )
        return top[0]

    def ground_truth_topic(self) -> str | None:
        """The ground-truth topic, or ``None`` for an unlabelled (robot-recorded) bag."""
        topics = self.topics
        if GROUND_TRUTH_TOPIC in topics:
            if topics[GROUND_TRUTH_TOPIC] != GROUND_TRUTH_TYPE:
                raise BagError(
                    f"{self.path}: {GROUND_TRUTH_TOPIC} has type {topics[GROUND_TRUTH_TOPIC]}, "
                    f"expected {GROUND_TRUTH_TYPE}"
                )
            return GROUND_TRUTH_TOPIC
        labelled = [t for t, typ in topics.items() if typ == GROUND_TRUTH_TYPE]
        return labelled[0] if labelled else None

    # ---- messages --------------------------------------------------------------------------------
    def raw_messages(self, topics: list[str]) -> Iterator[tuple[str, int, bytes]]:
        """``(topic, log_time_ns, raw CDR bytes)`` in log-time order; damage -> :class:`BagError`."""
        conns = [c for c in self._reader.connections if c.topic in topics]
        missing = set(topics) - {c.topic for c in conns}
        if missing:
            raise BagError(
                f"{self.path}: missing topic(s) {', '.join(sorted(missing))} (topics: {_list(self.topics)})"
            )
        iterator = self._reader.messages(connections=conns)
        errors = _storage_errors()
        while True:
            try:
                conn, timestamp, data = next(iterator)
            except StopIteration:
                return
            except errors as exc:
                raise BagError(f"{self.path}: corrupt or truncated bag ({_one_line(exc)})") from None
            yield conn.topic, int(timestamp), bytes(data)

    def deserialize(self, raw: bytes, msgtype: str, topic: str = "") -> Any:
        """CDR bytes -> rosbags object; unknown types and damaged payloads -> :class:`BagError`."""
        store = get_typestore()
        if msgtype not in store.types:
            raise BagError(
                f"{self.path}: unknown message type {msgtype} on {topic or 'a topic'} "
                "(the bag carries no definition for it)"
            )
        try:
            return store.deserialize_cdr(raw, msgtype)
        except Exception as exc:  # rosbags raises assorted errors on garbage CDR
            raise BagError(f"{self.path}: corrupt {msgtype} message on {topic} ({_one_line(exc)})") from None

    def read_ground_truth(self, topic: str | None = None) -> dict[int, GroundTruthFrame]:
        """All ground-truth frames keyed by header stamp (small: boxes and strings only)."""
        topic = topic or self.ground_truth_topic()
        if topic is None:
            return {}
        frames: dict[int, GroundTruthFrame] = {}
        for _, _, raw in self.raw_messages([topic]):
            msg = self.deserialize(raw, GROUND_TRUTH_TYPE, topic)
            stamp = stamp_to_ns(msg.header.stamp)
            faces = [GroundTruthFace.from_msg(f) for f in msg.faces]
            frames[stamp] = GroundTruthFrame(stamp, faces, msg.source)
        return frames

    def images(self, topic: str) -> Iterator[BagImage]:
        """The image messages of ``topic`` (deserialized, not decoded), in log-time order."""
        msgtype = self.topics.get(topic)
        if msgtype not in IMAGE_TYPES:
            raise BagError(f"{self.path}: topic {topic} is not an image topic")
        for _, log_time, raw in self.raw_messages([topic]):
            msg = self.deserialize(raw, msgtype, topic)
            yield BagImage(log_time, stamp_to_ns(msg.header.stamp), msgtype, raw, msg)

    def close(self) -> None:
        """Release the storage files."""
        if self._reader is not None:
            with contextlib.suppress(Exception):
                self._reader.close()
            self._reader = None

    def __enter__(self) -> BagReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_bag_image(image: BagImage) -> np.ndarray:
    """RGB ``uint8`` pixels of a bag image; a malformed buffer is a :class:`BagError`."""
    from facial_perception.pipeline.images import ImageDecodeError, decode_compressed, decode_raw

    msg = image.message
    try:
        if image.msgtype == COMPRESSED_IMAGE_TYPE:
            return decode_compressed(msg.data, msg.format)
        return decode_raw(msg.data, msg.width, msg.height, msg.step, msg.encoding, msg.is_bigendian)
    except ImageDecodeError as exc:
        raise BagError(f"image at stamp {image.stamp_ns} ns: {exc}") from None


def _declared_storage(meta: Path) -> str:
    from ruamel.yaml import YAML, YAMLError

    try:
        data = YAML(typ="safe").load(meta.read_text(encoding="utf-8"))
        return str(data["rosbag2_bagfile_information"]["storage_identifier"])
    except (OSError, YAMLError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BagError(f"{meta}: unreadable bag metadata ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _list(topics: dict[str, str]) -> str:
    return ", ".join(sorted(topics)) or "none"
