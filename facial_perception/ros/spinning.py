"""Running rclpy nodes: in a background thread for code that drives a graph from outside (tests,
benchmarks, tools), or as the main loop of a node's process, with one shutdown order for all."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import rclpy
from rclpy.action import ActionClient
from rclpy.executors import Executor, ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node

__all__ = ["BackgroundNode", "spin_until_shutdown"]


class BackgroundNode:
    """A plain node in its own context, spun by a single-threaded executor in a daemon thread.

    Its own context keeps it apart from any other rclpy user in the process (a test's node, the
    node under benchmark): create publishers, subscriptions and clients on :attr:`node`, then
    :meth:`close`.
    """

    def __init__(self, name: str) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._action_nodes: list[Node] = []
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def create_action_client(self, action_type: Any, action_name: str) -> ActionClient:
        """An action client, on a node of its own that joins the executor once the client is built.

        rclpy's ``ActionClient`` registers itself with its node before it has its lock (rclpy 9.1,
        ros2/rclpy#1589); an executor spinning that node meanwhile can meet it half-built, raise
        ``AttributeError: ... '_lock'`` and stop spinning, after which no answer arrives.
        """
        node = rclpy.create_node(
            f"{self.node.get_name()}_action_{len(self._action_nodes)}", context=self.context
        )
        client = ActionClient(node, action_type, action_name)
        self._action_nodes.append(node)
        self.executor.add_node(node)
        return client

    @staticmethod
    def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``predicate`` every 50 ms until true; after ``timeout`` s, TimeoutError naming ``what``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop spinning, destroy the node, shut the context down."""
        self.executor.shutdown(timeout_sec=2.0)
        for node in self._action_nodes:
            node.destroy_node()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def spin_until_shutdown(node: Node, executor: Executor, cleanup: Callable[[], None] | None = None) -> int:
    """Spin ``node`` on ``executor`` until Ctrl-C, SIGTERM or an external shutdown, then tear down:
    ``cleanup`` (errors ignored: the process is ending), executor, node, context. Returns 0."""
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
