"""A small REP-155 consumer: what the ROS4HRI bridge publishes, one readable line per face.

It follows ``/humans/faces/tracked``, subscribes to each new face's ``softbiometrics``,
``expression``, ``landmarks`` and ``aligned`` image as the face appears, and reads
``/humans/candidate_matches``. The demo runs it with
``--hri-bridge``; it is also a template for a node of your own that reads ROS4HRI faces.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

__all__ = ["HriFace", "HriListener"]

_GENDERS = {1: "female", 2: "male", 3: "other"}


@dataclass
class HriFace:
    """The newest of what REP-155 said about one face id."""

    face_id: str
    softbiometrics: Any = None
    expression: Any = None
    landmarks: Any = None
    aligned: Any = None
    person: str = ""
    person_confidence: float = 0.0

    def describe(self) -> str:
        """``face abcde: person Ada (0.81)  age 29 (0.64)  female (0.97)  happy (0.88)``."""
        parts = []
        if self.person:
            parts.append(f"person {self.person} ({self.person_confidence:.2f})")
        bio = self.softbiometrics
        if bio is not None:
            parts.append(f"age {bio.age} ({bio.age_confidence:.2f})")
            parts.append(f"{_GENDERS.get(bio.gender, 'undefined')} ({bio.gender_confidence:.2f})")
        if self.expression is not None:
            parts.append(f"{self.expression.expression} ({self.expression.confidence:.2f})")
        if self.landmarks is not None:
            parts.append(f"{sum(p.c > 0 for p in self.landmarks.landmarks)} landmarks")
        if self.aligned is not None:
            parts.append(f"aligned {self.aligned.width}x{self.aligned.height}")
        return f"face {self.face_id}: " + ("  ".join(parts) or "(left before its topics were matched)")


@dataclass
class _Counts:
    tracked_lists: int = 0
    matches: int = 0
    face_ids: list[str] = field(default_factory=list)  # in order of appearance


class HriListener(Node):
    """Subscribes to the REP-155 face topics under ``humans_namespace`` and keeps the newest per face."""

    def __init__(self, humans_namespace: str = "/humans", **kwargs: Any) -> None:
        super().__init__("hri_listener", **kwargs)
        import hri_msgs.msg as hri

        self._hri = hri
        self._root = "/" + humans_namespace.strip("/")
        self._qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self._lock = threading.Lock()
        self.faces: dict[str, HriFace] = {}
        self._face_subscriptions: dict[str, list[Any]] = {}  # faces in view only
        self.counts = _Counts()
        self.create_subscription(hri.IdsList, f"{self._root}/faces/tracked", self._on_tracked, self._qos)
        self.create_subscription(hri.IdsMatch, f"{self._root}/candidate_matches", self._on_match, self._qos)

    def _on_tracked(self, msg: Any) -> None:
        with self._lock:
            self.counts.tracked_lists += 1
            new = [face_id for face_id in msg.ids if face_id not in self.faces]
            for face_id in new:
                self.faces[face_id] = HriFace(face_id)
                self.counts.face_ids.append(face_id)
        # subscriptions outside the lock (their callbacks take it); a face that left (the bridge lists a
        # face until it is gone) loses its subscriptions, so a long run does not pile them up
        for face_id in [f for f in self._face_subscriptions if f not in msg.ids]:
            for subscription in self._face_subscriptions.pop(face_id):
                self.destroy_subscription(subscription)
        for face_id in new:
            face, root = self.faces[face_id], f"{self._root}/faces/{face_id}"
            self._face_subscriptions[face_id] = [
                self.create_subscription(msg_type, f"{root}/{topic}", self._setter(face, topic), self._qos)
                for msg_type, topic in (
                    (self._hri.SoftBiometrics, "softbiometrics"),
                    (self._hri.Expression, "expression"),
                    (self._hri.FacialLandmarks, "landmarks"),
                    (Image, "aligned"),
                )
            ]

    def _setter(self, face: HriFace, attribute: str) -> Any:
        def callback(msg: Any) -> None:
            with self._lock:
                setattr(face, attribute, msg)

        return callback

    def _on_match(self, msg: Any) -> None:
        with self._lock:
            self.counts.matches += 1
            face = self.faces.setdefault(msg.id1, HriFace(msg.id1))
            if msg.confidence > 0.0:
                face.person, face.person_confidence = msg.id2, float(msg.confidence)
            elif face.person == msg.id2:
                face.person, face.person_confidence = "", 0.0

    def save_aligned(self, path: Path, limit: int = 12) -> Path | None:
        """The newest aligned image of each face (up to ``limit``, in order of appearance) side by side."""
        with self._lock:
            images = [
                self.faces[i].aligned for i in self.counts.face_ids if self.faces[i].aligned is not None
            ]
        tiles = []
        for msg in images[-limit:]:
            if msg.encoding == "bgr8" and len(msg.data) >= msg.height * msg.step:
                rows = np.frombuffer(bytes(msg.data), np.uint8)[: msg.height * msg.step]
                tile = rows.reshape(msg.height, msg.step)[:, : msg.width * 3].reshape(
                    msg.height, msg.width, 3
                )
                tiles.append(cv2.resize(tile, (128, 128)))
        if not tiles:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.hstack(tiles))
        return path

    def summary(self) -> list[str]:
        """A count line, then one line per face seen (in order of appearance)."""
        with self._lock:
            counts = self.counts
            lines = [
                f"ROS4HRI ({self._root}): {counts.tracked_lists} tracked lists, {len(counts.face_ids)} face "
                f"id(s), {counts.matches} person match message(s)"
            ]
            lines += [f"    {self.faces[face_id].describe()}" for face_id in counts.face_ids]
        return lines
