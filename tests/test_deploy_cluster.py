"""deploy/: each cluster's files agree with each other. Its fleet, its Ray cluster launcher
file and its KubeRay manifest describe one elastic pool (worker counts that match the node types
Ray's autoscaler sees, the resources each worker asks for), run one image with token
authentication, and give the host cache its shared memory.

Each file's own tool checks it in tests/test_deploy_schemas.py; the shared pieces live in
tests/deploy_helpers.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("deploy_helpers")
from deploy_helpers import (  # noqa: E402
    CLUSTERS, DEPLOY, KUBERAYS, LAUNCHERS, ROOT, SERVE_CONFIG, autoscaler_config, cluster_of,
    dockerfile_args, dockerfile_instructions, fleet_of, groups_of, head_pod, kuberay_objects,
    launcher, launcher_validate, option, raycluster, read, serve_command_lines)
from tokenpool.config import parse_size  # noqa: E402
from tokenpool.fleet import load_fleet  # noqa: E402

# The AWS instance types the launcher files name: (vCPUs, GPUs). `ray up` asks EC2 for these;
# a new instance type in a launcher file must be added here.
INSTANCES = {"g5.2xlarge": (8, 1), "m7i.xlarge": (4, 0), "c7i.4xlarge": (16, 0)}


# (Parametrized by file name: conftest skips a test whose id has the word "gpu" without CUDA.)
@pytest.mark.parametrize("name", [c["fleet"] for c in CLUSTERS.values()])
def test_cluster_fleets_join_the_running_ray_cluster_and_are_elastic(name):
    fleet = load_fleet(DEPLOY / name, check_memory=False)
    pool = fleet.pool
    assert (pool.backend, pool.ray_address) == ("ray", "auto")
    assert pool.elastic, "the cluster manifests autoscale: give the pool min/max_workers"
    # A GPU worker asks for a GPU; a CPU worker for CPUs and the custom resource, which only
    # the worker nodes declare (the head serves).
    on_cpu = fleet.engine.device == "cpu"
    assert on_cpu == (name == CLUSTERS["cpu"]["fleet"])
    assert (pool.worker_resource is not None) == on_cpu


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_nodes_run_one_image(name):
    config = launcher(name)
    docker = config["docker"]
    assert docker["image"] and not {"head_image", "worker_image"} & set(docker)
    types = config["available_node_types"]
    assert not any("docker" in t for t in types.values()), "a node type overrides the image"


def launcher_slots(name: str, node_type: dict) -> int:
    """How many of the fleet's worker actors one node of this type can host."""
    pool = fleet_of(name).pool
    instance = node_type["node_config"]["InstanceType"]
    assert instance in INSTANCES, f"{name}: add {instance} to INSTANCES"
    vcpus, gpus = INSTANCES[instance]
    resources = node_type.get("resources", {})
    if pool.worker_resource is None:
        return resources.get("GPU", gpus)
    units = resources.get(pool.worker_resource, 0)
    assert units * pool.cpus_per_worker <= resources.get("CPU", vcpus), \
        f"{name}: {units} x {pool.worker_resource} but not {pool.cpus_per_worker:g} CPUs each"
    return units


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_node_types_match_the_elastic_pool(name):
    """The pool's min_workers and max_workers are worker actors; the autoscaler keeps each
    node type between its min_workers and max_workers nodes. They must say the same."""
    config = launcher_validate(launcher(name))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    low, high = fleet_of(name).pool.workers_range
    on_head = launcher_slots(name, head)
    assert on_head + sum(t["min_workers"] * launcher_slots(name, t) for t in workers) == low
    assert on_head + sum(t["max_workers"] * launcher_slots(name, t) for t in workers) == high
    assert config["max_workers"] >= sum(t["max_workers"] for t in workers)
    if fleet_of(name).pool.worker_resource is not None:
        assert on_head == 0, "the head serves; no worker should land there"
    else:
        # `tokenpool serve` checks the fleet against engine.device (cuda) when it loads it.
        assert on_head >= 1, "the head needs a GPU"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_runs_ray_with_token_auth_on_every_node(name):
    config = launcher(name)
    # Every process in every node's container: `ray start`, the autoscaler, the server.
    assert "--env=RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    # The token itself, where Ray looks for it, the same on every node.
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_the_synced_checkout_on_every_node(name):
    config = launcher(name)
    extra = "[gpu]" if fleet_of(name).engine.device.startswith("cuda") else ""
    assert f'pip install --quiet "$HOME/tokenpool-src{extra}"' in config["setup_commands"]
    # What it installs is this checkout, synced to every node.
    assert config["file_mounts"].get("~/tokenpool-src") == "."


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_head_starts_ray_with_the_autoscaler_then_tokenpool_serve(name):
    config = launcher(name)
    commands = config["head_start_ray_commands"]
    ray_at = next(i for i, c in enumerate(commands) if "ray start --head" in c)
    serve_at = next(i for i, c in enumerate(commands) if "tokenpool serve" in c)
    assert ray_at < serve_at
    # Without it the head runs no autoscaler, and the pool never grows past its nodes.
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in commands[ray_at]
    workers = " ".join(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in workers


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_serves_its_fleet_from_the_synced_checkout(name):
    args = serve_command_lines()[name]
    path = option(args, "--config")
    assert path.startswith("$HOME/tokenpool-src/"), path
    local = ROOT / path.removeprefix("$HOME/tokenpool-src/")
    assert local == DEPLOY / cluster_of(name)["fleet"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_shm_holds_the_host_cache_and_the_object_store(name):
    config = launcher(name)
    (shm,) = [o for o in config["docker"]["run_options"] if o.startswith("--shm-size=")]
    shm_bytes = parse_size(shm.split("=", 1)[1].replace("g", "GiB"))
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    stores = [int(m) for c in starts for m in re.findall(r"--object-store-memory=(\d+)", c)]
    assert len(stores) == 2
    assert shm_bytes >= fleet_of(name).memory.host_cache_bytes + max(stores)


# ---------------------------------------------------------------------------------------------
# KubeRay


@pytest.mark.parametrize("name", KUBERAYS)
def test_kuberay_manifest_holds_the_cluster_its_fleet_and_services(name):
    objects = kuberay_objects(name)
    assert sorted(o["kind"] for o in objects.values()) == \
        ["ConfigMap", "RayCluster", "Service", "Service"]
    # Nothing clashes when both manifests go into one namespace.
    others = [n for n in KUBERAYS if n != name]
    for other in others:
        assert not set(objects) & set(kuberay_objects(other)), (name, other)


@pytest.mark.parametrize("name", KUBERAYS)
def test_kuberay_configmap_fleet_is_the_cluster_fleet(name, tmp_path):
    (configmap,) = [o for o in kuberay_objects(name).values() if o["kind"] == "ConfigMap"]
    text = configmap["data"]["fleet.yaml"]
    assert yaml.safe_load(text) == yaml.safe_load(read(cluster_of(name)["fleet"]))
    (tmp_path / "fleet.yaml").write_text(text)
    fleet = load_fleet(tmp_path / "fleet.yaml", check_memory=False)
    assert (fleet.pool.backend, fleet.pool.ray_address) == ("ray", "auto")
    # ... and it is what the head serves.
    mounts = {m["mountPath"]: m["name"] for m in head_pod(name)["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head_pod(name)["volumes"]}
    assert volumes[mounts[str(Path(SERVE_CONFIG).parent)]]["configMap"]["name"] == \
        configmap["metadata"]["name"]


@pytest.mark.parametrize("name", KUBERAYS)
def test_kuberay_head_runs_the_generated_ray_start_then_tokenpool_serve(name):
    cluster = raycluster(name)
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    (container,) = head_pod(name)["containers"]
    (script,) = container["args"]
    ray_at = script.index('"$KUBERAY_GEN_RAY_START_CMD"')
    serve_at = script.index(f"tokenpool serve --config {SERVE_CONFIG}")
    assert ray_at < serve_at
    # Kubernetes expands $(NAME) in command and args itself; the script must not contain it.
    assert "$(" not in script


@pytest.mark.parametrize("name", KUBERAYS)
def test_kuberay_pods_share_the_image_and_its_ray_version(name):
    cluster = raycluster(name)
    images = {g["template"]["spec"]["containers"][0]["image"] for g in groups_of(cluster)}
    assert len(images) == 1, images
    assert cluster["spec"]["rayVersion"] == dockerfile_args()["RAY_VERSION"]
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    assert '"ray[default]==${RAY_VERSION}"' in runs


@pytest.mark.parametrize("name", KUBERAYS)
def test_kuberay_autoscaler_sees_the_elastic_pool(name):
    """What Ray's autoscaler makes of the RayCluster (Ray's own code, as the autoscaler
    sidecar runs it): its node types offer exactly the pool's min_workers, num_workers and
    max_workers worker actors."""
    cluster = raycluster(name)
    fleet = fleet_of(name)
    pool = fleet.pool
    assert cluster["spec"]["enableInTreeAutoscaling"] is pool.elastic

    def slots(resources: dict) -> int:
        if pool.worker_resource is None:
            return resources.get("GPU", 0)
        units = resources.get(pool.worker_resource, 0)
        assert units * pool.cpus_per_worker <= resources["CPU"], \
            f"{units} x {pool.worker_resource} but not {pool.cpus_per_worker:g} CPUs each"
        return units

    types = autoscaler_config(cluster)["available_node_types"]
    on_head = slots(types.pop("headgroup")["resources"])
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(types) == set(groups)
    low, high = pool.workers_range
    assert on_head + sum(t["min_workers"] * slots(t["resources"]) for t in types.values()) == low
    assert on_head + sum(t["max_workers"] * slots(t["resources"]) for t in types.values()) == high
    assert on_head + sum(groups[n]["replicas"] * slots(t["resources"])
                         for n, t in types.items()) == pool.num_workers
    if pool.worker_resource is not None:
        assert on_head == 0, "the head serves; no worker should land there"
    else:
        # `tokenpool serve` checks the fleet against engine.device (cuda) when it loads it.
        assert on_head >= 1, "the head needs a GPU"


@pytest.mark.parametrize("name", KUBERAYS)
def test_kuberay_group_resources_are_declared_once(name):
    """KubeRay's own rule (ray-operator validation.go): a group's `resources` field and the
    resource flags of its rayStartParams exclude each other."""
    for group in groups_of(raycluster(name)):
        if group.get("resources"):
            flags = {"num-cpus", "num-gpus", "memory", "resources"}
            assert not flags & set(group["rayStartParams"]), group.get("groupName", "head")


@pytest.mark.parametrize("name", KUBERAYS)
def test_kuberay_runs_ray_with_token_auth_everywhere(name):
    cluster = raycluster(name)
    # KubeRay makes the token (a Secret) and hands it to every Ray container, the autoscaler
    # and the init containers; it refuses token mode for Ray before 2.52.
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    major, minor = map(int, cluster["spec"]["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52)
    for group in groups_of(cluster):
        ray_container = group["template"]["spec"]["containers"][0]  # KubeRay's Ray container
        env = {e["name"]: e.get("value") for e in ray_container.get("env", [])}
        assert env.get("RAY_AUTH_MODE") == "token", group.get("groupName", "head")
        assert "RAY_AUTH_TOKEN" not in env, "the token comes from KubeRay's Secret"


@pytest.mark.parametrize("name", KUBERAYS)
def test_kuberay_pods_have_a_shm_for_the_host_cache(name):
    fleet = fleet_of(name)
    for group in groups_of(raycluster(name)):
        pod = group["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volume = {v["name"]: v for v in pod["volumes"]}[mounts["/dev/shm"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        store = int(group["rayStartParams"]["object-store-memory"])
        assert parse_size(volume["emptyDir"]["sizeLimit"].replace("Gi", "GiB")) >= \
            fleet.memory.host_cache_bytes + store
