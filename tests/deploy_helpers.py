"""What tests/test_deploy_*.py share: where deploy/'s files are, how each is read, and the
validators that stand for the tools that read them (tests/test_deploy_schemas.py says which).

Not a test module: pytest collects nothing here.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path

import yaml

from tokenpool.fleet import load_fleet

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "data" / "schemas"

# The Kubernetes version the manifests are checked against: the oldest minor release still
# maintained upstream (1.35; 1.36 and 1.37 are newer). Fields are never removed from v1 APIs,
# so what passes here is also accepted by the newer clusters.
K8S_VERSION = "1.35"
# KubeRay's RayCluster CRD, from the oldest release the manifests claim to need (v1.5: token
# authentication through authOptions) to the newest one vendored.
KUBERAY_RELEASES = ("v1.5.1", "v1.7.0")

# Each cluster the repository deploys: its fleet, its Ray cluster launcher file and its KubeRay
# manifest. The pool's `device` decides what a worker needs: a GPU, or CPUs plus one unit of
# the fleet's pool.worker_resource.
CLUSTERS = {
    "gpu": {"fleet": "fleet-cluster.yaml", "launcher": "ray-cluster.yaml",
            "kuberay": "kuberay.yaml"},
    "cpu": {"fleet": "fleet-cluster-cpu.yaml", "launcher": "ray-cluster-cpu.yaml",
            "kuberay": "kuberay-cpu.yaml"},
}
LAUNCHERS = [c["launcher"] for c in CLUSTERS.values()]
KUBERAYS = [c["kuberay"] for c in CLUSTERS.values()]

SERVE_CONFIG = "/etc/tokenpool/fleet.yaml"
IMAGE_CMD = ["tokenpool", "serve", "--config", SERVE_CONFIG, "--host", "0.0.0.0"]
HTTP_PORT, GRPC_PORT = 8000, 50051


def read(name: str) -> str:
    return (DEPLOY / name).read_text()


def load_yaml_docs(name: str) -> list:
    return [d for d in yaml.safe_load_all(read(name)) if d is not None]


def cluster_of(filename: str) -> dict:
    return next(c for c in CLUSTERS.values() if filename in c.values())


def fleet_of(filename: str):
    """The fleet served by the cluster that `filename` belongs to."""
    return load_fleet(DEPLOY / cluster_of(filename)["fleet"], check_memory=False)


# ---------------------------------------------------------------------------------------------
# Reading the files


def launcher(name: str) -> dict:
    (config,) = load_yaml_docs(name)
    return config


def kuberay_objects(name: str) -> dict[str, dict]:
    docs = load_yaml_docs(name)
    by_name = {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}
    assert len(by_name) == len(docs), "two objects share a kind and a name"
    return by_name


def raycluster(name: str) -> dict:
    (cluster,) = [o for o in kuberay_objects(name).values() if o["kind"] == "RayCluster"]
    return cluster


def groups_of(cluster: dict) -> list[dict]:
    return [cluster["spec"]["headGroupSpec"]] + cluster["spec"]["workerGroupSpecs"]


def head_pod(name: str) -> dict:
    return raycluster(name)["spec"]["headGroupSpec"]["template"]["spec"]


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


def serve_command_lines() -> dict[str, list[str]]:
    """Every `tokenpool serve ...` command line in deploy/, as argument lists."""
    texts = {"Dockerfile CMD": shlex.join(IMAGE_CMD)}
    for name in LAUNCHERS:
        texts[name] = "\n".join(load_yaml_docs(name)[0]["head_start_ray_commands"])
    for name in KUBERAYS:
        texts[name] = head_pod(name)["containers"][0]["args"][0]
    lines = {}
    for where, text in texts.items():
        text = text.replace("\\\n", " ")
        found = re.findall(r"\btokenpool serve --[^\n&;>|]*", text)
        assert len(found) == 1, f"{where}: expected one `tokenpool serve`, found {found}"
        lines[where] = shlex.split(found[0])[2:]
    return lines


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


# ---------------------------------------------------------------------------------------------
# The validators


def k8s_validate(obj: dict) -> None:
    """Raise unless `obj` is a valid Kubernetes object of K8S_VERSION, unknown fields refused."""
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def k8s_validate_pod_template(template: dict) -> None:
    """A RayCluster group's `template` as the core/v1 PodTemplateSpec it is (inside a
    PodTemplate, the object kind that holds one)."""
    k8s_validate({"apiVersion": "v1", "kind": "PodTemplate",
                  "metadata": {"name": "check"}, "template": template})


def _strict(schema):
    """An OpenAPI structural schema that also refuses unknown fields. The API server prunes
    them, and `kubectl apply` (strict field validation) refuses them: without this a misspelt
    key (`minReplica`, `enableInTreeAutoscalng`) would pass silently."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def raycluster_validator(release: str):
    """KubeRay's RayCluster CRD (ray.io/v1) as a JSON Schema validator. The x-kubernetes-*
    extensions (list types, CEL rules on fields these manifests leave out) are not checked."""
    import jsonschema

    schema = json.loads((SCHEMAS / f"kuberay-{release}-raycluster-v1.json").read_text())
    return jsonschema.Draft202012Validator(_strict(schema))


def kuberay_validate(obj: dict, release: str) -> None:
    import jsonschema

    errors = sorted(raycluster_validator(release).iter_errors(obj), key=lambda e: list(e.path))
    if errors:
        raise jsonschema.ValidationError("; ".join(
            f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message[:300]}" for e in errors[:5]))


def autoscaler_config(raycluster: dict) -> dict:
    """The autoscaling config Ray's autoscaler derives from a RayCluster on KubeRay (Ray's own
    code; it validates the result against ray-schema.json)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    raycluster = copy.deepcopy(raycluster)
    raycluster["metadata"].setdefault("namespace", "default")  # set by the API server
    return _derive_autoscaling_config_from_ray_cr(raycluster)


def launcher_validate(config: dict) -> dict:
    """What `ray up` does to a cluster config before it reaches the cloud: fill in Ray's
    defaults for the provider, then validate (ray-schema.json and Ray's consistency checks).
    Only the node types' resources stay as written (`ray up` adds CPU and GPU counts from EC2)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared
