"""The sweep's markdown report and its plot: attainment against rate, per scheduler."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from tokenpool.bench.serve_report import fmt

BASELINES = ("request-level", "request-level-plus", "static")


def plot(result: dict, path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, entry in result.items():
        rates = [p["rate"] for p in entry["points"]]
        line, = ax.plot(rates, [p["slo_attainment"] for p in entry["points"]], "o-",
                        label=f"{name} ({entry['num_models']} models)")
        for key, style, what in (("simulated", "--", "simulated"),
                                 ("simulated_measured_steps", ":", "simulated, measured steps")):
            simulated = entry.get(key)
            if simulated:
                ax.plot([p["rate"] for p in simulated["points"]],
                        [p["slo_attainment"] for p in simulated["points"]], style,
                        color=line.get_color(), alpha=0.6, label=f"{name}, {what}")
    ax.axhline(0.9, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("arrival rate over the fleet (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _overhead(result: dict) -> list[str]:
    held = {e.get("baseline_switch_overhead_s") or 0.0 for e in result.values()}
    if held == {0.0}:
        return []
    return [f"The request-level baselines held their worker {max(held):g} s after every switch "
            "(`--baseline-switch-overhead`): the engine re-initialisation of the paper's "
            "ServerlessLLM baseline, emulated. Token-level switches by tokenpool's hot swap "
            "alone.", ""]


def markdown(result: dict, *, title: str, command: str, config: str, slo: dict,
             plot_path: str | None = None, rule: dict | None = None) -> str:
    lines = [f"# {title}", "",
             f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} by:", "",
             "```", command, "```", "",
             f"Fleet: `{config}`. SLO per model: TTFT {slo['ttft_s']} s, TBT {slo['tbt_s']} s. "
             "Every point ran on a fresh server; every number is measured on the client.", "",
             *_overhead(result),
             *_rule(rule, slo),
             "## Sustainable rate (highest rate with attainment >= 90%, and at every lower "
             "rate)", "",
             "| scheduler | models | workers | sustainable req/s | per worker | simulated | "
             "simulated / real | simulated, measured steps | (/ real) | by goodput (90% of "
             "requests meet both) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in result.items():
        sim = e.get("simulated", {}).get("max_rate_at_90")
        measured = e.get("simulated_measured_steps", {}).get("max_rate_at_90")
        lines.append(f"| {name} | {e['num_models']} | {e['num_workers']} | "
                     f"{fmt(e['max_rate_at_90'], 2)} | {fmt(e['max_rate_per_device'], 2)} | "
                     f"{fmt(sim, 2)} | {fmt(e.get('simulated_over_real'), 2)} | "
                     f"{fmt(measured, 2)} | {fmt(e.get('simulated_measured_steps_over_real'), 2)}"
                     f" | {fmt(e.get('max_rate_at_90_met'), 2)} |")
    if any("simulated_measured_steps" in e for e in result.values()):
        lines += ["", "Simulated: the same requests and policy objects on the start-up profile. "
                  "Measured steps: on that profile slowed, point by point, to the decode step "
                  "time the point's workers measured against it (`decode_step_ratio`)."]
    lines += _ratios(result)
    if plot_path:
        lines += ["", f"![attainment against rate]({plot_path})"]
    return "\n".join(lines + _every_point(result)) + "\n"


def _every_point(result: dict) -> list[str]:
    lines = ["", "## Every point", "",
             "TBT is the client's inter-chunk gap (vLLM's ITL). Shed and failed requests "
             "count as misses.", "",
             "| scheduler | rate | attainment | goodput req/s | throughput req/s | tok/s | "
             "TTFT p50 / p95 / p99 ms | TBT p50 / p95 / p99 ms | switches | shed | "
             "steps / profile |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in result.items():
        for p in e["points"]:
            lines.append(
                f"| {name} | {p['rate']:g} | {fmt(p['slo_attainment'], 3)} | "
                f"{fmt(p['request_goodput'], 2)} | {fmt(p['request_throughput'], 2)} | "
                f"{fmt(p['output_throughput'], 0)} | {_trio(p, 'ttft')} | {_trio(p, 'itl')} | "
                f"{p['switches']} | {p['shed']} | {fmt(p.get('decode_step_ratio'), 2)} |")
    return lines


def _rule(rule: dict | None, slo: dict) -> list[str]:
    if not rule:
        return []
    tbt_s = 0.1 * rule["r"]
    return [f"SLO rule inputs, from the cost profile these servers fitted: decode step at "
            f"batch 8 {rule['cpu_step_ms']:.2f} ms here against {rule['gpu_step_ms']:.2f} ms "
            f"for Qwen2.5-7B on H800, r = {rule['r']:.3f}; the rule gives TBT = 100 ms x r = "
            f"{1e3 * tbt_s:.0f} ms and TTFT = 10 s x r x 0.5 = {5 * rule['r']:.2f} s. The "
            f"SLOs used are {slo['tbt_s'] / tbt_s:.2f}x the rule's TBT and "
            f"{slo['ttft_s'] / (5 * rule['r']):.2f}x its TTFT.", ""]


def _ratios(result: dict) -> list[str]:
    ours = result.get("token-level", {}).get("max_rate_at_90")
    lines = []
    for name in BASELINES:
        theirs = result.get(name, {}).get("max_rate_at_90")
        if ours and theirs:
            lines.append(f"- token-level / {name}: **{ours / theirs:.2f}x**")
        elif ours and name in result:
            lines.append(f"- token-level / {name}: {name} sustains no rate of the sweep")
    return [""] + lines if lines else []


def _trio(point: dict, name: str) -> str:
    return " / ".join(fmt(point[f"{p}_{name}_ms"], 0) for p in ("median", "p95", "p99"))




def write(path, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
