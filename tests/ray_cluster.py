"""A Ray cluster of several nodes on this host, started with `ray start` as an operator does.

Each `ray start` is a raylet of its own: a separate node to Ray, with its own resources and
object store. Killing a node's raylet (and so its worker processes) is how a node is lost.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
WORKER_RESOURCE = "tokenpool_worker"
# Token authentication, as a Ray 2.60 cluster runs it: every node and the driver need
# RAY_AUTH_MODE=token and the cluster's token. The token is this run's own, so the test does
# not depend on whether ~/.ray/auth_token exists.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
ENV = {**os.environ, **AUTH, "RAY_USAGE_STATS_ENABLED": "0"}
START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, list[bytes]]:
    """pid -> its command line, of every process on this host."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
    return found


def raylets(gcs_port: int | None = None) -> dict[str, int]:
    """Node id -> raylet pid, of the raylets on this host (of one cluster: its GCS port)."""
    found = {}
    for pid, args in _processes().items():
        if not args or not args[0].endswith(b"/raylet"):
            continue
        if gcs_port is not None and not _of_cluster(args, gcs_port):
            continue
        for arg in args:
            if arg.startswith(b"--node_id="):
                found[arg.split(b"=", 1)[1].decode()] = pid
    return found


def _of_cluster(args: list[bytes], gcs_port: int) -> bool:
    """Whether a Ray process's arguments name this cluster's GCS (ray's own processes
    pass it as --gcs-address=IP:PORT, --gcs_server_port=PORT or inside a longer argument)."""
    marks = (f":{gcs_port} ".encode(), f"--gcs_server_port={gcs_port}".encode())
    return any(arg.endswith(f":{gcs_port}".encode()) or any(m in arg + b" " for m in marks)
               for arg in args)

class Cluster:
    """`ray start --head` plus `ray start --address` nodes; each node declares one worker."""

    def __init__(self, cpus_per_node: int = 1, object_store_bytes: int = 100 << 20):
        self.address = ""
        self.port = 0
        self.nodes: list[str] = []  # node ids, in start order
        self._common = [f"--num-cpus={cpus_per_node}",
                        f"--resources={json.dumps({WORKER_RESOURCE: 1})}",
                        f"--object-store-memory={object_store_bytes}"]

    def start_head(self) -> str:
        self.port = _free_port()
        node = self._start(["--head", f"--port={self.port}", "--include-dashboard=false",
                            "--disable-usage-stats"])
        self.address = f"127.0.0.1:{self.port}"
        return node

    def add_node(self) -> str:
        return self._start([f"--address={self.address}"])

    def _start(self, args: list[str]) -> str:
        before = set(raylets(self.port))
        subprocess.run([RAY, "start", *args, *self._common], env=ENV, check=True,
                       capture_output=True, timeout=START_TIMEOUT_S)
        new = set(raylets(self.port)) - before
        assert len(new) == 1, new
        node = new.pop()
        self.nodes.append(node)
        return node

    def kill_node(self, node: str) -> None:
        """Lose `node` as a crashed machine is lost: its raylet and every process under it."""
        pid = raylets(self.port)[node]
        children = _children(pid)
        os.kill(pid, signal.SIGKILL)
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Stop this cluster's processes only (`ray stop` would stop every Ray on the host)."""
        if not self.port:
            return
        ours = [pid for pid, args in _processes().items() if _of_cluster(args, self.port)]
        for pid in ours + [c for pid in ours for c in _children(pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _children(pid: int) -> list[int]:
    """Every process started by `pid`, transitively (its worker processes)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
