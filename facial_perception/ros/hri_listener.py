"""A small REP-155 consumer: what the ROS4HRI bridge publishes, one readable line per face.

It follows ``/humans/faces/tracked``, subscribes to each new face's ``softbiometrics`` and
``expression`` as the face appears, and reads ``/humans/candidate_matches``. The demo runs it with
``--hri-bridge``; it is also a template for a node of your own that reads ROS4HRI faces.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy

__all__ = ["HriFace", "HriListener"]

_GENDERS = {1: "female", 2: "male", 3: "other"}


@dataclass
class HriFace:
    """The newest of what REP-155 said about one face id."""

    face_id: str
    softbiometrics: Any = None
    expression: Any = None
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
