"""Identity gallery on real SQLite files: permissions, enrol/match/forget, persistence, errors."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from facial_perception.pipeline.gallery import UNKNOWN, GalleryError, IdentityGallery

DIM = 32


@pytest.fixture
def people() -> dict[str, np.ndarray]:
    """Three well separated random identity directions."""
    rng = np.random.default_rng(7)
    return {name: rng.normal(size=DIM) for name in ("ada", "grace", "linus")}


def _samples(centre: np.ndarray, count: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    unit = centre / np.linalg.norm(centre)
    return unit + noise * rng.normal(size=(count, centre.size)) / np.sqrt(centre.size)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_is_created_0600_in_a_0700_folder(tmp_path: Path) -> None:
    path = tmp_path / "private" / "nested" / "gallery.db"
    old_umask = os.umask(0o000)  # even a permissive umask must not loosen the file
    try:
        gallery = IdentityGallery(path)
    finally:
        os.umask(old_umask)
    gallery.enrol("ada", np.ones((2, DIM)))
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    for extra in path.parent.iterdir():  # WAL/SHM side files inherit the database's mode
        assert _mode(extra) & 0o077 == 0, extra
    gallery.close()


def test_loose_permissions_of_an_existing_file_are_fixed_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "gallery.db"
    IdentityGallery(path).close()
    os.chmod(path, 0o644)
    with pytest.warns(UserWarning, match="tightened to 600"):
        gallery = IdentityGallery(path)
    assert _mode(path) == 0o600
    gallery.close()


def test_enrol_match_unknown_and_forget(tmp_path: Path, people: dict[str, np.ndarray]) -> None:
    gallery = IdentityGallery(tmp_path / "g.db", threshold=0.6)
    for seed, (name, centre) in enumerate(people.items()):
        assert gallery.enrol(name, _samples(centre, 5, 0.3, seed)) == 5
    assert gallery.names() == ["ada", "grace", "linus"]
    assert gallery.counts() == {"ada": 5, "grace": 5, "linus": 5}
    assert gallery.dim == DIM and len(gallery) == 3 and "grace" in gallery

    for seed, (name, centre) in enumerate(people.items()):
        probe = _samples(centre, 1, 0.3, 100 + seed)[0]
        matched, confidence = gallery.match(probe)
        assert matched == name and 0.6 <= confidence <= 1.0

    stranger = np.random.default_rng(3).normal(size=DIM)
    name, confidence = gallery.match(stranger)
    assert name == UNKNOWN and 0.0 <= confidence < 0.6

    batch = gallery.match(np.stack([people["linus"], stranger, people["ada"]]))
    assert [n for n, _ in batch] == ["linus", UNKNOWN, "ada"]

    assert gallery.forget("grace") is True
    assert gallery.forget("grace") is False
    assert gallery.names() == ["ada", "linus"]
    assert gallery.match(people["grace"])[0] == UNKNOWN
    gallery.close()


def test_threshold_decides_open_set(tmp_path: Path, people: dict[str, np.ndarray]) -> None:
    path = tmp_path / "g.db"
    with IdentityGallery(path, threshold=0.5) as gallery:
        gallery.enrol("ada", people["ada"])
    halfway = people["ada"] / np.linalg.norm(people["ada"]) + np.random.default_rng(5).normal(size=DIM) * 0.25
    with IdentityGallery(path, threshold=-1.0) as loose:
        similarity = loose.match(halfway)[1]
    assert 0.2 < similarity < 0.99
    with IdentityGallery(path, threshold=similarity - 0.01) as below:
        assert below.match(halfway)[0] == "ada"
    with IdentityGallery(path, threshold=similarity + 0.01) as above:
        assert above.match(halfway)[0] == UNKNOWN


def test_mean_and_max_matching_differ_as_documented(tmp_path: Path) -> None:
    # "ada" has two very different samples; the probe equals one of them.
    e1, e2, e3 = np.eye(3)
    path = tmp_path / "g.db"
    with IdentityGallery(path, threshold=0.9, match_mode="max") as gallery:
        gallery.enrol("ada", np.stack([e1, e2]))
        assert gallery.match(e1) == ("ada", pytest.approx(1.0))
    with IdentityGallery(path, threshold=0.9, match_mode="mean") as gallery:
        name, confidence = gallery.match(e1)
        assert name == UNKNOWN and confidence == pytest.approx(np.sqrt(0.5), abs=1e-5)
        assert gallery.match(e3) == (UNKNOWN, pytest.approx(0.0, abs=1e-6))


def test_persists_across_reopen(tmp_path: Path, people: dict[str, np.ndarray]) -> None:
    path = tmp_path / "g.db"
    gallery = IdentityGallery(path)
    gallery.enrol("ada", _samples(people["ada"], 3, 0.2, 1))
    gallery.enrol("ada", _samples(people["ada"], 2, 0.2, 2))  # a second enrolment adds samples
    gallery.enrol("linus", people["linus"])
    gallery.close()
    reopened = IdentityGallery(path)
    assert reopened.counts() == {"ada": 5, "linus": 1}
    assert reopened.match(people["linus"])[0] == "linus"
    reopened.close()


def test_an_open_gallery_sees_what_another_process_changed(
    tmp_path: Path, people: dict[str, np.ndarray]
) -> None:
    """The node keeps its gallery open; an enrolment or forget by another connection (the
    facial-perception-gallery command) counts from its next match on, without a reload."""
    path = tmp_path / "g.db"
    node = IdentityGallery(path)
    node.enrol("ada", people["ada"])
    assert node.match(people["linus"])[0] == UNKNOWN  # the cache now holds ada only
    other = IdentityGallery(path)
    other.enrol("linus", people["linus"])
    assert node.match(people["linus"])[0] == "linus"
    other.forget("ada")
    assert node.match(people["ada"])[0] == UNKNOWN
    other.close()
    node.close()


def test_empty_gallery_says_unknown(tmp_path: Path) -> None:
    with IdentityGallery(tmp_path / "g.db") as gallery:
        assert gallery.match(np.ones(DIM)) == (UNKNOWN, 0.0)
        assert gallery.names() == [] and gallery.dim is None


def test_bad_requests_change_nothing(tmp_path: Path, people: dict[str, np.ndarray]) -> None:
    gallery = IdentityGallery(tmp_path / "g.db")
    gallery.enrol("ada", people["ada"])
    bad = [
        (("ada", np.ones((2, DIM + 1))), "dimension 33 does not match the gallery's 32"),
        (("", np.ones(DIM)), "must not be empty"),
        (("  ", np.ones(DIM)), "must not be empty"),
        (("unknown", np.ones(DIM)), "reserved"),
        (("x\n", np.ones(DIM)), None),  # stripped to "x": allowed
        (("a\x00b", np.ones(DIM)), "control characters"),
        (("bob", np.zeros((2, DIM))), "zero length"),
        (("bob", np.full(DIM, np.nan)), "NaN"),
        (("bob", np.ones((0, DIM))), "non-empty"),
        (("bob", np.ones((2, 2, 2))), "non-empty"),
        ((42, np.ones(DIM)), "must be a string"),
    ]
    for (name, embeddings), message in bad:
        if message is None:
            gallery.enrol(name, embeddings)
            continue
        with pytest.raises(GalleryError, match=message):
            gallery.enrol(name, embeddings)
    assert gallery.counts() == {"ada": 1, "x": 1}
    with pytest.raises(GalleryError, match="dimension 8 does not match"):
        gallery.match(np.ones(8))
    with pytest.raises(GalleryError, match="threshold"):
        IdentityGallery(tmp_path / "other.db", threshold=2.0)
    gallery.close()


def test_the_first_enrolment_ties_the_gallery_to_its_model(
    tmp_path: Path, people: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    """Another model's embeddings of the same length would name the wrong people: refused, nothing changes;
    emptied, the gallery takes any model again."""
    path = tmp_path / "g.db"
    with IdentityGallery(path) as gallery:
        assert gallery.fingerprint is None
        gallery.check_model(DIM, "model-a")  # empty: any model fits
        gallery.enrol("ada", people["ada"], fingerprint="model-a")
        gallery.enrol("grace", people["grace"], fingerprint="model-a")
        with pytest.raises(
            GalleryError, match=r"enrolled with another model .*model-a.*model-b.*nothing enrolled"
        ):
            gallery.enrol("linus", people["linus"], fingerprint="model-b")
        with pytest.raises(GalleryError, match="fingerprint must be a non-empty string"):
            gallery.enrol("linus", people["linus"], fingerprint=" ")
        assert gallery.counts() == {"ada": 1, "grace": 1}
    with IdentityGallery(path) as gallery:  # kept in the file
        assert gallery.fingerprint == "model-a"
        gallery.check_model(DIM, "model-a")
        gallery.check_model(None, None)  # a model without an identity column: nothing to check
        with pytest.raises(GalleryError, match="was enrolled with another model") as info:
            gallery.check_model(DIM, "model-b")
        assert "\n" not in str(info.value) and "enrol the people again" in str(info.value)
        with pytest.raises(
            GalleryError, match=f"holds {DIM}-d embeddings of another model, this model makes 8-d"
        ):
            gallery.check_model(8, "model-a")
        gallery.enrol("linus", people["linus"])  # without a fingerprint: trusted as before
        assert gallery.forget("ada") and gallery.forget("grace") and gallery.fingerprint == "model-a"
        assert gallery.forget("linus") and gallery.fingerprint is None  # empty again
        gallery.enrol("ada", people["ada"], fingerprint="model-b")
        assert gallery.fingerprint == "model-b"
    with IdentityGallery(tmp_path / "old.db") as old:  # enrolled before fingerprints were kept
        old.enrol("ada", people["ada"])
        with caplog.at_level("WARNING", logger="facial_perception.pipeline.gallery"):
            old.check_model(DIM, "model-a")
        assert "cannot be checked" in caplog.text
        old.enrol("grace", people["grace"], fingerprint="model-a")
        assert old.fingerprint is None  # cannot vouch for the earlier samples


def test_corrupt_file_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    os.chmod(path, 0o600)
    with pytest.raises(GalleryError, match="not a valid identity gallery") as info:
        IdentityGallery(path)
    assert "\n" not in str(info.value)

    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE songs (title TEXT)")
    conn.commit()
    conn.close()
    os.chmod(other, 0o600)
    with pytest.raises(GalleryError, match="not an identity gallery"):
        IdentityGallery(other)

    with pytest.raises(GalleryError, match="not a regular file"):
        IdentityGallery(tmp_path)


def test_truncated_gallery_is_detected(tmp_path: Path, people: dict[str, np.ndarray]) -> None:
    path = tmp_path / "g.db"
    with IdentityGallery(path) as gallery:
        for i in range(40):
            gallery.enrol(f"p{i}", _samples(people["ada"], 20, 0.5, i))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GalleryError):
        gallery = IdentityGallery(path)
        gallery.match(people["ada"])


def test_images_stored_only_when_enabled(tmp_path: Path, real_faces: list[np.ndarray]) -> None:
    crops = [face[:64, :64].copy() for face in real_faces]
    path = tmp_path / "g.db"
    with IdentityGallery(path) as gallery:
        gallery.enrol("ada", np.ones((2, DIM)), images=crops)
        assert gallery.image_count() == 0
    conn = sqlite3.connect(path)
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert "face_images" not in tables
    assert crops[0].tobytes() not in path.read_bytes()

    with IdentityGallery(tmp_path / "with_images.db", store_images=True) as gallery:
        gallery.enrol("ada", np.ones((2, DIM)), images=crops)
        assert gallery.image_count() == 2 and gallery.image_count("ada") == 2
        gallery.forget("ada")
        assert gallery.image_count() == 0


def test_concurrent_enrol_and_match(tmp_path: Path, people: dict[str, np.ndarray]) -> None:
    gallery = IdentityGallery(tmp_path / "g.db")
    gallery.enrol("ada", people["ada"])
    errors: list[BaseException] = []

    def matcher() -> None:
        try:
            for _ in range(200):
                assert gallery.match(people["ada"])[0] == "ada"
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=matcher) for _ in range(2)]
    for thread in threads:
        thread.start()
    for i in range(20):
        gallery.enrol(f"extra{i}", _samples(people["grace"], 1, 0.1, i))
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(gallery) == 21
    gallery.close()
