"""`tokenpool simulate capacity`: the fewest simulated devices each scheduler needs for 90% SLO
attainment, with a pinned-plus-pooled fleet (--pin-top) and an elastic pool (--autoscale) set
against it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenpool.cli import _args
from tokenpool.cli.simulate import _common, _float_list, _scheduler_names, _setup

CAPACITY_DESCRIPTION = """\
Find the fewest devices at which each scheduler reaches 90% SLO attainment on a workload
(doubling, then bisecting; the prefill:decode ratio is kept). `static` starts at one device per
model. The JSON maps each scheduler to {devices, tried: [{num_devices, slo_attainment}]} and
adds `saving` = 1 - token-level's devices / static's when both are present. With --pin-top K
(or the config's `pins:`), `NAME+pins` sizes a pinned-plus-pooled fleet too (docs/pinning.md).
With --autoscale, each scheduler's entry gains `autoscale`: {elastic: {slo_attainment,
device_hours, mean_devices, peak_devices, pool_sizes, ...}, fixed: {devices, slo_attainment,
device_hours}, device_hours_saving} (docs/elastic.md)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("capacity", help="devices each scheduler needs for 90%% attainment",
                       description=CAPACITY_DESCRIPTION, formatter_class=_args.HelpFormatter)
    _common(c, required=True)
    c.add_argument("--workload", metavar="CSV", type=Path, default=None,
                   help="requests (default: the config's workload: block)")
    c.add_argument("--schedulers", metavar="A,B,...", default="token-level,static",
                   help="comma-separated scheduler names (default: token-level,static)")
    c.add_argument("--pin-top", metavar="K", type=_args.positive_int, default=None,
                   help="also size a fleet pinning the K busiest models, the rest pooled")
    c.add_argument("--pin-workers", metavar="N", type=_args.positive_int, default=1,
                   help="devices for each of those pinned models (default: 1)")
    c.add_argument("--autoscale", action="store_true",
                   help="also run each scheduler on an elastic pool (the config's scaling: "
                        "block) and set its device-hours against the fixed pool found")
    c.add_argument("--load-shape", metavar="S,S,...", default=None,
                   type=_args.checked(_float_list, "--load-shape"),
                   help="keep these shares (<= 1) of the workload's requests in equal "
                        "stretches of its window: a load that rises and falls")
    _args.add_json_out(c)
    c.set_defaults(func=run_capacity)


def run_capacity(args: argparse.Namespace) -> int:
    from tokenpool.bench.report import write_json
    from tokenpool.sim import pinning, run as sim_run
    from tokenpool.sim.workload import load_aegaeon_csv
    from tokenpool.errors import ConfigError

    config, slo = _setup(args)
    fleet_models = None
    if args.workload is not None:
        workload = load_aegaeon_csv(args.workload)
    elif config.workload is not None:
        workload = config.workload.requests()
        fleet_models = getattr(config.workload, "num_models", None)
    else:
        raise ConfigError("--workload is required: the config has no workload: block")
    if args.load_shape:
        workload = _shaped(workload, args.load_shape)
    out: dict = {"requests": len(workload),
                 "num_models": fleet_models or len({r.model for r in workload}),
                 "models_with_requests": len({r.model for r in workload})}
    names = _scheduler_names(args.schedulers)
    for name in names:
        out[name] = sim_run.devices_needed(pinning.without_pins(config), workload, name, slo,
                                           fleet_models)
        sys.stdout.write(f"{name}: {out[name]['devices']} devices\n")
    pins = pinning.pins_for(config, workload, args.pin_top or 0, args.pin_workers)
    for key, found in pinning.pinned_reports(config, workload, names, slo, pins, out).items():
        out[key] = found
        sys.stdout.write(pinning.line(key, found))
    if args.autoscale:
        _autoscale(pinning.without_pins(config), workload, names, slo, out)
    token, static = out.get("token-level"), out.get("static")
    if token and static and token["devices"] and static["devices"]:
        out["saving"] = 1 - token["devices"] / static["devices"]
        sys.stdout.write(f"saving: {out['saving']:.1%}\n")
    write_json(args.json, out)
    return 0


def _shaped(workload: list, shares: list[float]) -> list:
    from tokenpool.errors import ConfigError
    from tokenpool.sim.autoscale import shaped

    try:
        return shaped(workload, shares)
    except ValueError as exc:
        raise ConfigError(f"--load-shape: {exc}") from exc


def _autoscale(config, workload: list, names: list[str], slo, out: dict) -> None:
    """Each scheduler on an elastic pool, against the fixed pool `out` found for it."""
    from tokenpool.sim.autoscale import compare

    for name in names:
        found = out[name]["autoscale"] = compare(config, workload, name, slo,
                                                 out[name]["devices"])
        e, f = found["elastic"], found["fixed"]
        fixed = "no fixed pool met 90%" if f is None else \
            f"fixed {f['devices']} devices: {f['device_hours']:.3f} device-hours, " \
            f"SLO attainment {f['slo_attainment']:.3f}"
        sys.stdout.write(f"{name} autoscaled: {e['device_hours']:.3f} device-hours (mean "
                         f"{e['mean_devices']:.2f}, peak {e['peak_devices']} devices), SLO "
                         f"attainment {e['slo_attainment']:.3f}; {fixed}\n")
