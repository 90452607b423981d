"""The offline evaluator's first stage (read, decode, detect, track, crop) in a worker process.

Why a process: in one process the first stage's Python (bag deserialisation, detector post-processing,
tracking) and the model threads' Python between tensor ops take turns on one GIL, and on 2 cores a
thread that waits for the GIL leaves a core idle. In a process of its own the first stage keeps its
own interpreter, like a ``torch.utils.data.DataLoader`` worker: it reads the bag itself and sends
each prepared frame (tracks, crops and the model's input batch; not the full image) to the model
threads of the parent, in order, through a bounded queue.

The worker is started with ``spawn`` (safe beside torch's and ROS's threads). An error of one frame
(e.g. a corrupt image) reaches the parent at that frame's turn, as in :func:`overlapped`; if the
worker dies, the parent gets a one-line error instead of waiting forever.
"""

from __future__ import annotations

import itertools
import multiprocessing
import pickle
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from facial_perception.bags.bag_io import BagError

#: Prepared frames waiting for the parent (each holds a few face crops: small).
QUEUE_DEPTH = 4
#: Seconds the parent waits for the worker's start (imports, detector, bag index) before giving up.
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class FrameRef:
    """What the evaluator needs of a bag image besides its pixels."""

    log_time_ns: int
    stamp_ns: int
    frame_id: str


class WorkerError(BagError):
    """The worker process failed outside any frame (start-up, or it died)."""


def _portable_error(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (to be raised again in the parent), else a one-line stand-in."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return WorkerError(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class FirstStageJob:
    """What the worker prepares: ``max_frames`` (None: all) images of ``topic`` in ``bag``, with the
    detector and tracker of ``settings`` (a ``PipelineSettings``) and crops for a model of ``input_size``."""

    bag: str
    storage: str | None
    topic: str
    max_frames: int | None
    settings: Any
    input_size: int


def _first_stage(job: FirstStageJob, out: Any, stop: Any) -> None:
    """Worker body: the frames of the job's topic in order through ``FramePipeline.prepare``."""

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        out.cancel_join_thread()  # the parent stopped reading: exit without flushing to it
        return False

    try:
        import torch

        torch.set_num_threads(1)  # the batch is only assembled here; the parent runs the model
        from facial_perception.bags.bag_io import BagReader, decode_bag_image
        from facial_perception.bags.evaluate_bag import build_first_stage

        pipeline = build_first_stage(job.settings, job.input_size)
        with BagReader(job.bag, job.storage) as reader:
            put(("ready", None, None))
            for image in itertools.islice(reader.images(job.topic), job.max_frames):
                ref = FrameRef(
                    image.log_time_ns, image.stamp_ns, getattr(image.message.header, "frame_id", "")
                )
                try:
                    t0 = time.perf_counter()
                    rgb = decode_bag_image(image)
                    decode_ms = (time.perf_counter() - t0) * 1000.0
                    prepared = pipeline.prepare(rgb, stamp=image.stamp_ns / 1e9, decode_ms=decode_ms)
                except Exception as exc:  # raised in the parent at this frame's turn
                    put(("error", ref, _portable_error(exc)))
                    return
                batch = None if prepared.batch is None else prepared.batch.numpy()
                named = None if prepared.identity_batch is None else prepared.identity_batch.numpy()
                if not put(("frame", ref, replace(prepared, frame=None, batch=batch, identity_batch=named))):
                    return
    except Exception as exc:  # start-up, or the bag's iterator itself failed
        put(("error", None, _portable_error(exc)))
        return
    put(("end", None, None))


class FirstStageProcess:
    """The bag's frames prepared in a worker process: iterate for ``(FrameRef, PreparedFrame)`` in order.

    The constructor returns once the worker is ready (detector built, bag opened), so that a caller
    can start its clock after the set-up, and raises the worker's start-up error if it has one.
    :meth:`close` (also on ``with`` exit) stops the worker, iterated to the end or not.
    """

    def __init__(self, job: FirstStageJob) -> None:
        context = multiprocessing.get_context("spawn")
        self._out = context.Queue(maxsize=QUEUE_DEPTH)
        self._stop = context.Event()
        self._worker = context.Process(
            target=_first_stage,
            args=(job, self._out, self._stop),
            name="bag-first-stage",
            daemon=True,
        )
        self._worker.start()
        try:
            kind, _ref, value = self._take(START_TIMEOUT_S)
            if kind == "error":
                raise value
        except BaseException:
            self.close()
            raise

    def _take(self, timeout: float | None) -> tuple:
        waited = 0.0
        while True:
            try:
                return self._out.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                if not self._worker.is_alive():
                    try:  # what it sent just before it ended
                        return self._out.get(timeout=0.5)
                    except queue.Empty:
                        pass
                    code = self._worker.exitcode
                    raise WorkerError(
                        f"the first-stage worker process died (exit code {code}); a script that evaluates "
                        "bags offline needs `if __name__ == '__main__':` around its code (the worker is "
                        "spawned and imports the script), or use first_stage_process=False"
                    ) from None
                if timeout is not None and waited >= timeout:
                    raise WorkerError(
                        f"the first-stage worker process did not start in {timeout:.0f} s"
                    ) from None

    def __iter__(self) -> Iterator[tuple[FrameRef, Any]]:
        import torch

        while True:
            kind, ref, value = self._take(None)
            if kind == "end":
                return
            if kind == "error":
                raise value
            if value.batch is not None:
                value.batch = torch.from_numpy(value.batch)
            if value.identity_batch is not None:
                value.identity_batch = torch.from_numpy(value.identity_batch)
            yield ref, value

    def close(self) -> None:
        """Stop the worker (idempotent)."""
        self._stop.set()
        self._worker.join(timeout=5.0)
        if self._worker.is_alive():
            self._worker.terminate()
            self._worker.join(timeout=5.0)
        self._out.close()
        self._out.cancel_join_thread()

    def __enter__(self) -> FirstStageProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
