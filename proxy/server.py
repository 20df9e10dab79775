"""`tokenpool serve`: the HTTP and gRPC edges over one serving stack, in one asyncio loop.

Prints `ready http=HOST:PORT grpc=HOST:PORT` (DESIGN §6) once both listen and the pool is up,
then serves until SIGINT/SIGTERM, and shuts down in order: stop taking requests (health goes
NOT_SERVING), let streams in flight end within a grace period, then stop the workers.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass

from tokenpool.proxy.config import ProxyConfig
from tokenpool.proxy.frontend import Frontend

GRACE_S = 5.0


@dataclass(slots=True)
class Listening:
    http: str  # host:port actually bound (a configured port 0 picks a free one)
    grpc: str


class EdgeServers:
    """uvicorn (OpenAI HTTP) and grpc.aio (tokenpool.v1) over one Frontend."""

    def __init__(self, stack, config: ProxyConfig):
        from tokenpool.proxy.metrics import ServingMetrics

        self.stack = stack
        self.config = config
        self.metrics = ServingMetrics(stack.controller, stack.catalog)
        self.frontend = Frontend(stack.controller, stack.catalog, config, self.metrics)
        self._uvicorn = None
        self._grpc = None
        self._http_task = None

    async def start(self) -> Listening:
        import uvicorn

        from tokenpool.proxy.grpc_server import create_grpc_server
        from tokenpool.proxy.http_app import create_app

        host = self.config.host
        app = create_app(self.frontend, self.stack.controller, self.config, self.metrics)
        self._grpc = create_grpc_server(self.frontend, self.config,
                                        f"{_bracket(host)}:{self.config.grpc_port}")
        await self._grpc.start()
        self._uvicorn = uvicorn.Server(uvicorn.Config(
            app, host=host, port=self.config.http_port, log_level="warning",
            access_log=False, lifespan="off", timeout_graceful_shutdown=GRACE_S))
        self._uvicorn.install_signal_handlers = lambda: None  # ours, below, stop both edges
        self._http_task = asyncio.create_task(self._uvicorn.serve())
        while not self._uvicorn.started:
            if self._http_task.done():  # e.g. the port is taken
                self._http_task.result()
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.02)
        http_port = self._uvicorn.servers[0].sockets[0].getsockname()[1]
        return Listening(f"{host}:{http_port}", f"{host}:{self._grpc.bound_port}")

    async def stop(self) -> None:
        from tokenpool.proxy.grpc_server import stop_grpc_server

        if self._grpc is not None:  # health goes NOT_SERVING first, then streams drain
            await stop_grpc_server(self._grpc, GRACE_S)
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            await self._http_task


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def serve_until_stopped(stack, config: ProxyConfig, announce=print) -> None:
    edges = EdgeServers(stack, config)
    listening = await edges.start()
    announce(f"ready http={listening.http} grpc={listening.grpc}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("tokenpool: shutting down", file=sys.stderr, flush=True)
    await edges.stop()


def serve(fleet, announce=None) -> None:
    """Build the stack from a loaded fleet, serve until a signal, then close everything."""
    from tokenpool.controller.stack import build_stack

    stack = build_stack(fleet)
    announce = announce or (lambda line: print(line, flush=True))
    try:
        asyncio.run(serve_until_stopped(stack, fleet.proxy, announce))
    finally:
        stack.close()
