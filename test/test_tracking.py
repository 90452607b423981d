"""Face tracker (stable ids, new ids, removal) and per-track prediction smoothing."""

from __future__ import annotations

import numpy as np
import pytest

from facial_perception.pipeline.detection import Detection
from facial_perception.pipeline.smoothing import PredictionSmoother, SmootherError
from facial_perception.pipeline.tracking import FaceTracker, TrackerError, iou_matrix


def _det(x: float, y: float, size: float = 80.0, score: float = 0.9) -> Detection:
    return Detection(np.array([x, y, x + size, y + size], np.float32), score)


def test_iou_matrix_values() -> None:
    a = np.array([[0, 0, 10, 10], [100, 100, 110, 110]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [50, 50, 60, 60]], np.float32)
    iou = iou_matrix(a, b)
    assert iou.shape == (2, 3)
    assert iou[0, 0] == pytest.approx(1.0)
    assert iou[0, 1] == pytest.approx(50 / 150)
    assert iou[0, 2] == 0.0 and np.all(iou[1] == 0.0)


def test_ids_stay_stable_on_moving_faces() -> None:
    tracker = FaceTracker()
    ids_per_frame = []
    for frame in range(30):
        # Two faces moving in opposite directions, 6 px per frame, given in changing order.
        dets = [_det(50 + 6 * frame, 100), _det(400 - 6 * frame, 120, size=60)]
        if frame % 2:
            dets.reverse()
        tracks = tracker.update(dets)
        assert [t.detection_index for t in tracks] == [0, 1]
        ids_per_frame.append({round(float(t.box[2] - t.box[0])): t.track_id for t in tracks})
    assert all(ids == {80: 1, 60: 2} for ids in ids_per_frame)
    final = {t.track_id: t for t in tracker.tracks}
    assert final[1].hits == 30 and final[1].age == 30 and final[1].missed == 0


def test_fast_motion_without_overlap_keeps_the_id() -> None:
    # 30 px per frame on a 40 px face: IoU 0.14 < 0.3, centre distance and velocity keep the id.
    tracker = FaceTracker()
    ids = [tracker.update([_det(10 + 30 * f, 50, size=40)])[0].track_id for f in range(8)]
    assert ids == [1] * 8
    # A jump of several face sizes is another face.
    assert tracker.update([_det(600, 400, size=40)])[0].track_id == 2


def test_new_face_gets_a_new_id_and_ids_are_never_reused() -> None:
    tracker = FaceTracker(max_missed=1)
    assert [t.track_id for t in tracker.update([_det(0, 0)])] == [1]
    tracks = tracker.update([_det(2, 0), _det(300, 300)])
    assert sorted(t.track_id for t in tracks) == [1, 2]
    tracker.update([])
    tracker.update([])  # both gone after max_missed=1
    assert tracker.tracks == [] and sorted(tracker.removed_ids) == [1, 2]
    assert [t.track_id for t in tracker.update([_det(0, 0)])] == [3]


def test_track_survives_misses_then_is_dropped() -> None:
    tracker = FaceTracker(max_missed=3)
    tracker.update([_det(100, 100)])
    for missed in range(1, 4):
        assert tracker.update([]) == []  # coasting tracks are not reported
        assert tracker.tracks[0].missed == missed and tracker.removed_ids == []
    # Seen again after 3 misses: same id.
    assert tracker.update([_det(104, 100)])[0].track_id == 1
    for _ in range(3):
        tracker.update([])
    assert tracker.update([]) == [] and tracker.removed_ids == [1] and tracker.tracks == []


def test_min_hits_hides_tentative_tracks() -> None:
    tracker = FaceTracker(min_hits=3)
    assert tracker.update([_det(0, 0)]) == []
    assert tracker.update([_det(1, 0)]) == []
    assert [t.track_id for t in tracker.update([_det(2, 0)])] == [1]
    # A one-frame false positive disappears on its first miss.
    tracker.update([_det(3, 0), _det(400, 400)])
    tracker.update([_det(4, 0)])
    assert [t.track_id for t in tracker.tracks] == [1] and tracker.removed_ids == [2]


def test_tracker_rejects_bad_settings() -> None:
    with pytest.raises(TrackerError, match="iou_threshold"):
        FaceTracker(iou_threshold=1.5)
    with pytest.raises(TrackerError, match="min_hits"):
        FaceTracker(min_hits=0)


def test_smoother_averages_and_reacts() -> None:
    smoother = PredictionSmoother(alpha=0.5)
    labels = ["a", "b"]
    first = smoother.smooth(1, "gender", labels, np.array([1.0, 0.0]))
    assert np.allclose(first, [1.0, 0.0])
    second = smoother.smooth(1, "gender", labels, np.array([0.0, 1.0]))
    assert np.allclose(second, [0.5, 0.5])
    third = smoother.smooth(1, "gender", labels, np.array([0.0, 1.0]))
    assert np.allclose(third, [0.25, 0.75])
    # Another track and another task are independent.
    assert np.allclose(smoother.smooth(2, "gender", labels, np.array([0.0, 1.0])), [0.0, 1.0])
    assert np.allclose(smoother.smooth(1, "emotion", labels, np.array([0.9, 0.1])), [0.9, 0.1])


def test_smoother_resets_on_label_change_and_drops_removed_tracks() -> None:
    smoother = PredictionSmoother(alpha=0.3)
    smoother.smooth(7, "age", ["young", "old"], np.array([1.0, 0.0]))
    # The column was hot-swapped with a different label set: no blending with the old state.
    fresh = smoother.smooth(7, "age", ["child", "adult", "senior"], np.array([0.1, 0.2, 0.7]))
    assert np.allclose(fresh, [0.1, 0.2, 0.7])
    smoother.smooth_embedding(7, np.ones(4))
    smoother.smooth(8, "age", ["young", "old"], np.array([0.5, 0.5]))
    assert smoother.tracked_ids == {7, 8}
    smoother.drop([7])
    assert smoother.tracked_ids == {8}
    smoother.retain([])
    assert smoother.tracked_ids == set()


def test_smoother_embeddings_are_unit_averages() -> None:
    smoother = PredictionSmoother(alpha=0.5)
    a = smoother.smooth_embedding(1, np.array([3.0, 0.0]))
    assert np.allclose(a, [1.0, 0.0])
    b = smoother.smooth_embedding(1, np.array([0.0, 2.0]))
    assert np.allclose(b, [np.sqrt(0.5), np.sqrt(0.5)])
    assert np.linalg.norm(b) == pytest.approx(1.0)
    # A dimension change (other model) restarts the average.
    assert np.allclose(smoother.smooth_embedding(1, np.array([0.0, 0.0, 5.0])), [0, 0, 1])


def test_smoother_rejects_bad_input() -> None:
    with pytest.raises(SmootherError, match="alpha"):
        PredictionSmoother(alpha=0.0)
    smoother = PredictionSmoother()
    with pytest.raises(SmootherError, match="3 probabilities for 2 labels"):
        smoother.smooth(1, "x", ["a", "b"], np.array([0.2, 0.3, 0.5]))
    with pytest.raises(SmootherError, match="NaN"):
        smoother.smooth(1, "x", ["a", "b"], np.array([np.nan, 1.0]))
    with pytest.raises(SmootherError, match="NaN"):
        smoother.smooth_embedding(1, np.array([np.inf, 1.0]))
