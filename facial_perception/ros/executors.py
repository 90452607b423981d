"""A thread-pool rclpy executor that waits instead of spinning while a callback is queued.

Why not ``rclpy.executors.MultiThreadedExecutor``: in rclpy up to at least 9.1.2 (Kilted; the
fix is ros2/rclpy#1547, for issue #1452) its spin thread hands a callback to the pool and, until a
pool thread has *started* it, gets the same callback back from ``wait_for_ready_callbacks`` at
once, again and again.  That loop holds the GIL, so the pool threads that should start the
callback, and the node's own model threads, hardly run: on the 2-core benchmark machine the
perception node processed 12.7 of 30 frames/s on it and all 30 on this executor, in the same
benchmark run (docs/BENCHMARK_ROS.md).

:class:`PooledExecutor` uses only the public executor API (``wait_for_ready_callbacks``,
``spin_once``): a callback is submitted once; when the spin thread gets back a callback that is
still queued, it waits (GIL released) for a pool thread to start it.  Coroutine callbacks that
yield are submitted again when the executor hands them back, as rclpy's own executors do.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

from rclpy.context import Context
from rclpy.executors import (
    ConditionReachedException,
    Executor,
    ExternalShutdownException,
    ShutdownException,
    TimeoutException,
)
from rclpy.task import Future


def _never() -> bool:
    return False


#: Longest wait for a queued callback to start before the spin thread looks for other work (s).
QUEUED_WAIT_S = 0.05


class PooledExecutor(Executor):
    """Runs callbacks in ``num_threads`` pool threads (like ``MultiThreadedExecutor``) without busy-waiting.

    Callback groups keep their meaning: a mutually exclusive group runs one callback at a time,
    a reentrant group runs as many as there are free threads.  An exception raised by a callback
    is re-raised by the next :meth:`spin_once` in the spinning thread, as rclpy's executors do.
    """

    # what rclpy's Executor.__del__ reads, for an instance whose __init__ raised before the base's ran
    _sigint_gc = None

    def __init__(self, num_threads: int = 4, *, context: Context | None = None) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        super().__init__(context=context)
        self.num_threads = int(num_threads)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.num_threads, thread_name_prefix="ros-callback"
        )
        self._lock = threading.Lock()
        self._started: dict[Any, threading.Event] = {}  # submitted, not yet returned: handler -> started
        self._errors: list[BaseException] = []

    def spin(self) -> None:
        """Dispatch callbacks until the context shuts down or :meth:`shutdown` is called.

        Defined here (not inherited) so that it relies on this class's dispatch only, whatever the
        base class of a future rclpy calls internally.
        """
        while self.context.ok() and self._dispatch_one(None, _never):
            pass

    def spin_once(self, timeout_sec: float | None = None) -> None:
        """Wait for one ready callback (at most ``timeout_sec``) and hand it to the pool."""
        self._dispatch_one(timeout_sec, _never)

    def spin_once_until_future_complete(self, future: Future, timeout_sec: Any = None) -> None:
        """As :meth:`spin_once`, but return as soon as ``future`` is done."""
        future.add_done_callback(lambda _future: self.wake())
        self._dispatch_one(timeout_sec, future.done)

    # rclpy >= 9 (Kilted) drives ``spin_until_future_complete`` through this name.
    _spin_once_until_future_complete = spin_once_until_future_complete

    def _dispatch_one(self, timeout_sec: Any, condition: Callable[[], bool]) -> bool:
        """One dispatch step; False once the executor or its context has shut down."""
        with self._lock:
            if self._errors:
                raise self._errors.pop(0)
        try:
            handler, _entity, _node = self.wait_for_ready_callbacks(timeout_sec, None, condition)
        except (ShutdownException, ExternalShutdownException):
            return False
        except (TimeoutException, ConditionReachedException):
            return True
        with self._lock:
            started = self._started.get(handler)
            if started is None:
                started = threading.Event()
                self._started[handler] = started
                self._pool.submit(self._run, handler, started)
                return True
        # Queued but not started yet: rclpy hands it back until a pool thread starts it.
        started.wait(QUEUED_WAIT_S)
        return True

    def _run(self, handler: Any, started: threading.Event) -> None:
        started.set()
        try:
            handler()
            error = handler.exception()
        except BaseException as exc:
            error = exc
        with self._lock:
            self._started.pop(handler, None)
            if error is not None:
                self._errors.append(error)
        if error is not None:
            self.wake()

    def shutdown(self, timeout_sec: float | None = None) -> bool:
        """Stop dispatching, wait up to ``timeout_sec`` for running callbacks, drop queued ones."""
        finished = super().shutdown(timeout_sec)
        self._pool.shutdown(wait=finished, cancel_futures=True)
        return finished
