"""PooledExecutor: rclpy's callback-group semantics in a thread pool, without a busy spin thread.

Real rclpy nodes, timers and a publisher in a child process over DDS (conftest.py isolates the
domain).  The busy-wait check counts how often ``spin_once`` returns per delivered message: with
rclpy 9.1.2's ``MultiThreadedExecutor`` the same check counted ~46 returns per message (5298 for
115 messages in 8 s, the spin thread using a core), with :class:`PooledExecutor` 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup  # noqa: E402
from rclpy.executors import Executor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.task import Future  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from facial_perception.ros.executors import PooledExecutor  # noqa: E402
from facial_perception.ros.perception_node import EXECUTOR_ENV, executor_kind  # noqa: E402


@pytest.fixture
def ros_node() -> Iterator[tuple[Node, PooledExecutor]]:
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("fp_executor_test", context=context)
    executor = PooledExecutor(num_threads=3, context=context)
    executor.add_node(node)
    try:
        yield node, executor
    finally:
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown(context=context)


def spin_until(executor: Executor, done: Callable[[], bool], timeout_s: float = 20.0) -> int:
    """Call ``spin_once`` until ``done()``; returns how many calls it took."""
    deadline = time.monotonic() + timeout_s
    calls = 0
    while not done():
        assert time.monotonic() < deadline, "timed out waiting for callbacks"
        executor.spin_once(timeout_sec=0.1)
        calls += 1
    return calls


def test_reentrant_callbacks_run_in_parallel(ros_node: tuple[Node, PooledExecutor]) -> None:
    node, executor = ros_node
    barrier = threading.Barrier(2, timeout=10.0)
    met: list[str] = []
    group = ReentrantCallbackGroup()

    def make(name: str) -> Callable[[], None]:
        def callback() -> None:
            if name in met:
                return
            barrier.wait()  # breaks (and raises) unless the other callback runs at the same time
            met.append(name)

        return callback

    timers = [node.create_timer(0.01, make(n), callback_group=group) for n in ("a", "b")]
    spin_until(executor, lambda: len(met) == 2)
    assert sorted(met) == ["a", "b"]
    for timer in timers:
        node.destroy_timer(timer)


def test_mutually_exclusive_callbacks_never_overlap(ros_node: tuple[Node, PooledExecutor]) -> None:
    node, executor = ros_node
    group = MutuallyExclusiveCallbackGroup()
    lock = threading.Lock()
    state = {"running": 0, "most": 0, "calls": 0, "threads": set()}

    def callback() -> None:
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
            state["threads"].add(threading.current_thread().name)
        time.sleep(0.005)
        with lock:
            state["running"] -= 1
            state["calls"] += 1

    for _ in range(3):
        node.create_timer(0.002, callback, callback_group=group)
    spin_until(executor, lambda: state["calls"] >= 60)
    assert state["most"] == 1
    assert all(name.startswith("ros-callback") for name in state["threads"])  # never the spin thread


def test_callback_error_is_raised_by_spin_once(ros_node: tuple[Node, PooledExecutor]) -> None:
    node, executor = ros_node

    def broken() -> None:
        raise ValueError("bad callback")

    node.create_timer(0.01, broken)
    with pytest.raises(ValueError, match="bad callback"):
        spin_until(executor, lambda: False, timeout_s=20.0)


def test_spin_until_future_complete_returns_when_a_callback_completes_it(
    ros_node: tuple[Node, PooledExecutor],
) -> None:
    node, executor = ros_node
    future = Future()
    ticks: list[int] = []

    def tick() -> None:
        ticks.append(1)
        if len(ticks) == 3:
            future.set_result("done")

    node.create_timer(0.01, tick)
    executor.spin_until_future_complete(future, timeout_sec=20.0)
    assert future.done() and future.result() == "done" and len(ticks) >= 3
    late = Future()  # nobody completes this one: the timeout ends the wait
    executor.spin_until_future_complete(late, timeout_sec=0.3)
    assert not late.done()


@pytest.mark.parametrize("stop", ["executor", "context"])
def test_spin_runs_callbacks_until_shutdown(stop: str) -> None:
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("fp_executor_spin_test", context=context)
    executor = PooledExecutor(num_threads=2, context=context)
    executor.add_node(node)
    ticked = threading.Event()
    node.create_timer(0.01, ticked.set)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    try:
        spinner.start()
        assert ticked.wait(20.0), "spin ran no callback"
        if stop == "executor":
            executor.shutdown(timeout_sec=2.0)
        else:
            rclpy.shutdown(context=context)
        spinner.join(20.0)
        assert not spinner.is_alive(), f"spin kept running after the {stop} shut down"
    finally:
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown(context=context)


def test_node_executor_is_chosen_by_environment() -> None:
    assert executor_kind({}) == "pooled"
    assert executor_kind({EXECUTOR_ENV: "multi_threaded"}) == "multi_threaded"
    with pytest.raises(ValueError, match="must be one of pooled, multi_threaded, got 'fast'"):
        executor_kind({EXECUTOR_ENV: "fast"})


def test_node_refuses_unknown_executor_with_one_line() -> None:
    env = {**os.environ, EXECUTOR_ENV: "fast"}
    cmd = [sys.executable, "-m", "facial_perception.ros.perception_node"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"perception_node: error: {EXECUTOR_ENV} must be one of pooled, multi_threaded, got 'fast'"
    ]


def test_num_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        PooledExecutor(num_threads=0)


PUBLISHER = textwrap.dedent(
    """
    import sys, time, rclpy
    from std_msgs.msg import String
    rclpy.init()
    node = rclpy.create_node("fp_executor_test_publisher")
    pub = node.create_publisher(String, "/fp_executor_test/chatter", 100)
    deadline = time.monotonic() + 60.0
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    for i in range(int(sys.argv[1])):
        pub.publish(String(data=str(i)))
        time.sleep(0.005)
    time.sleep(1.0)
    node.destroy_node()
    rclpy.shutdown()
    """
)


def test_spin_thread_waits_instead_of_spinning(ros_node: tuple[Node, PooledExecutor]) -> None:
    """Each message costs a couple of ``spin_once`` returns: no loop while a callback waits to start."""
    node, executor = ros_node
    received: list[str] = []
    node.create_subscription(String, "/fp_executor_test/chatter", lambda msg: received.append(msg.data), 100)
    messages = 300
    publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(messages)])
    try:
        spin_until(executor, lambda: len(received) > 0, timeout_s=90.0)  # discovery
        first = len(received)
        calls = spin_until(executor, lambda: len(received) >= messages * 0.9, timeout_s=90.0)
    finally:
        publisher.wait(timeout=30)
    assert len(received) >= messages * 0.9
    # Dispatch: one return per message, plus a few while a queued callback waits to start.
    delivered = len(received) - first
    assert calls <= 5 * delivered + 20, f"{calls} spin_once returns for {delivered} messages"
