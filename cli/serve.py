"""`tokenpool serve`: serve a fleet over OpenAI-compatible HTTP and gRPC."""

from __future__ import annotations

import dataclasses
import os

from tokenpool.cli import _args

HELP = """\
Serve every model of a fleet file from one pool of workers.

Start-up reads each model's header, packs the fleet's weights into the node's host cache
(once per node: a later start of the same fleet finds them there), starts the workers
(threads, or Ray actors with `pool.backend: ray`), profiles one engine per model shape for
the scheduler's cost model, and then prints exactly one line on stdout:

  ready http=HOST:PORT grpc=HOST:PORT

Logs and progress go to stderr. Endpoints: OpenAI-compatible /v1/completions and
/v1/chat/completions (streaming with SSE), /v1/models, /health, /version, /metrics
(Prometheus) and /pool (the operator's view); gRPC tokenpool.v1.Generation with health
and reflection. Ctrl-C (SIGINT) or SIGTERM shuts down gracefully.

examples:
  tokenpool serve --config configs/fleet.yaml
  tokenpool serve --config configs/fleet.yaml --backend ray --http-port 9000
  TOKENPOOL_API_KEY=secret tokenpool serve --config configs/fleet.yaml --host 0.0.0.0
"""


def add_parser(commands) -> None:
    p = commands.add_parser("serve", help="serve a fleet over HTTP (OpenAI API) and gRPC",
                            description=HELP, formatter_class=_args.HelpFormatter)
    _args.add_config(p)
    p.add_argument("--host", help="address to bind (default: proxy.host, 127.0.0.1)")
    p.add_argument("--http-port", type=_args.port, help="HTTP port (default: proxy.http_port, "
                                                        "8000; 0 picks a free one)")
    p.add_argument("--grpc-port", type=_args.port, help="gRPC port (default: proxy.grpc_port, "
                                                        "50051; 0 picks a free one)")
    p.add_argument("--api-key", help="require this key on /v1/* and gRPC (default: "
                                     "$TOKENPOOL_API_KEY, else proxy.api_key, else none)")
    p.add_argument("--backend", choices=("local", "ray"), help="override pool.backend")
    p.add_argument("--num-workers", type=_args.positive_int, help="override pool.num_workers")
    p.add_argument("--scheduler", help="override scheduler.name (token-level, request-level, "
                                       "request-level-plus, static)")
    p.add_argument("--baseline-switch-overhead", metavar="S", type=_args.non_negative_float,
                   help="override scheduler.baseline_switch_overhead_s: seconds a request-level "
                        "baseline holds its worker after each switch, standing for the engine "
                        "re-initialisation of a system without tokenpool's hot swap")
    p.set_defaults(func=run)


def run(args) -> int:
    from tokenpool.fleet import load_fleet
    from tokenpool.proxy.server import serve

    fleet = apply_overrides(load_fleet(args.config), args)
    serve(fleet)
    return 0


def apply_overrides(fleet, args):
    """Command-line flags beat the file; the environment's API key beats the file's."""
    proxy = fleet.proxy
    api_key = args.api_key or os.environ.get("TOKENPOOL_API_KEY") or proxy.api_key
    proxy = dataclasses.replace(proxy, api_key=api_key or None, **_given(
        host=args.host, http_port=args.http_port, grpc_port=args.grpc_port))
    pool = dataclasses.replace(fleet.pool, **_given(backend=args.backend,
                                                    num_workers=args.num_workers))
    scheduler = dataclasses.replace(fleet.scheduler, **_given(
        name=args.scheduler, baseline_switch_overhead_s=args.baseline_switch_overhead))
    return dataclasses.replace(fleet, proxy=proxy, pool=pool, scheduler=scheduler)


def _given(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}
