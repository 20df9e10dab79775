"""deploy/: every file is checked by the tool that reads it, and the files agree with each other
and with DESIGN §6, §7 and §9. This module runs each file through its tool;
tests/test_deploy_cluster.py checks that the cluster files agree, tests/test_deploy_files.py the
image, the ports and the monitoring; tests/deploy_helpers.py holds what they share.

Nothing here needs Docker, a cloud, a Kubernetes cluster or a network. Each check uses what the
tool that reads the file would use:

- Kubernetes objects (the ConfigMaps and Services, and every pod template inside a RayCluster):
  the JSON schemas of Kubernetes K8S_VERSION that the kubernetes-validate package ships, in
  their strict form, which rejects unknown fields as `kubectl apply` does (server-side field
  validation, strict by default).
- KubeRay RayClusters: the CRD's openAPIV3Schema of each KubeRay release in KUBERAY_RELEASES,
  vendored under tests/data/schemas/ (README there), made strict the same way.
- Ray's autoscaler on KubeRay: Ray's own code turns each RayCluster into the autoscaling config
  the autoscaler sidecar runs with (and checks it against ray-schema.json); the pool's worker
  counts must match the node types it sees (tests/test_deploy_cluster.py).
- Ray cluster launcher files: Ray's prepare_config and validate_config, what `ray up` runs on
  a config before it reaches a cloud (ray-schema.json plus Ray's own consistency checks).
- Fleet files: tokenpool's own loader. Shell scripts: `bash -n`. Command lines: the `tokenpool`
  argument parser. The image's install: setuptools.

Each validator is also shown a broken copy and must refuse it, so none passes by accident.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys

import pytest

pytest.register_assert_rewrite("deploy_helpers")
from deploy_helpers import (  # noqa: E402
    CLUSTERS, DEPLOY, GRPC_PORT, HTTP_PORT, KUBERAY_RELEASES, KUBERAYS, LAUNCHERS, ROOT,
    autoscaler_config, dockerfile_instructions, groups_of, k8s_validate, k8s_validate_pod_template,
    kuberay_objects, kuberay_validate, launcher, launcher_validate, load_yaml_docs, option,
    raycluster, serve_command_lines)
from tokenpool.fleet import load_fleet  # noqa: E402


def test_the_validators_refuse_broken_copies():
    """Every validator in tests/deploy_helpers.py refuses a wrong type, a missing required
    field and an unknown field, so that the checks below cannot pass by accepting anything."""
    import jsonschema

    def refused(validate, obj, change):
        broken = copy.deepcopy(obj)
        change(broken)
        with pytest.raises((jsonschema.ValidationError, ValueError)):
            validate(broken)

    objects = kuberay_objects("kuberay.yaml")
    service = objects["Service/tokenpool"]
    refused(k8s_validate, service, lambda s: s["spec"]["ports"][0].update(port="http"))
    refused(k8s_validate, service, lambda s: s["spec"].update(selectr={"a": "b"}))
    refused(k8s_validate, service, lambda s: s["spec"]["ports"][0].pop("port"))

    cluster = objects["RayCluster/tokenpool"]
    template = cluster["spec"]["headGroupSpec"]["template"]
    refused(k8s_validate_pod_template, template,
            lambda t: t["spec"]["containers"][0]["ports"][0].update(containerPort="6379"))
    refused(k8s_validate_pod_template, template,
            lambda t: t["spec"]["containers"][0].update(volumeMount=[]))
    refused(k8s_validate_pod_template, template, lambda t: t["spec"]["containers"][0].pop("name"))

    for release in KUBERAY_RELEASES:
        def validate(obj, release=release):
            kuberay_validate(obj, release)

        groups = lambda c: c["spec"]["workerGroupSpecs"]  # noqa: E731
        refused(validate, cluster, lambda c: groups(c)[0].update(maxReplicas="3"))
        refused(validate, cluster, lambda c: groups(c)[0].pop("groupName"))
        refused(validate, cluster, lambda c: groups(c)[0].update(minReplica=0))
        refused(validate, cluster, lambda c: c["spec"].update(enableInTreeAutoscalng=True))
        refused(validate, cluster, lambda c: c["spec"]["authOptions"].update(mode="tokens"))
    # The oldest release knows no field that came later (authOptions.secretName: v1.6).
    newer = copy.deepcopy(cluster)
    newer["spec"]["authOptions"]["secretName"] = "ray-token"
    kuberay_validate(newer, KUBERAY_RELEASES[-1])
    refused(lambda c: kuberay_validate(c, KUBERAY_RELEASES[0]), newer, lambda c: None)

    cpu_cluster = kuberay_objects("kuberay-cpu.yaml")["RayCluster/tokenpool-cpu"]
    refused(autoscaler_config, cpu_cluster,
            lambda c: c["spec"]["workerGroupSpecs"][0]["resources"].update(tokenpool_worker="two"))

    launcher = load_yaml_docs("ray-cluster.yaml")[0]
    refused(launcher_validate, launcher, lambda c: c.update(max_workers="3"))
    refused(launcher_validate, launcher, lambda c: c.update(max_worker=3))
    refused(launcher_validate, launcher, lambda c: c.update(head_node_type="tokenpool.head"))
    refused(launcher_validate, launcher,
            lambda c: c.update(max_workers=0, available_node_types={
                name: {**t, "min_workers": 1} for name, t in c["available_node_types"].items()}))


# ---------------------------------------------------------------------------------------------
# Every file parses and passes its tool's own checks


@pytest.mark.parametrize("path", sorted(p.name for p in DEPLOY.glob("*.y*ml")))
def test_every_yaml_file_parses(path):
    docs = load_yaml_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected mappings"


def test_the_expected_files_are_there():
    names = {"Dockerfile", "Dockerfile.dockerignore", "prometheus.yml", "grafana-dashboard.json",
             "fleet.yaml", "README.md"} | {n for c in CLUSTERS.values() for n in c.values()}
    for name in names:
        assert (DEPLOY / name).is_file(), f"deploy/{name} is missing"
    # A manifest no test knows of would be checked by nothing.
    for pattern in ("kuberay*.yaml", "ray-cluster*.yaml", "fleet*.yaml"):
        for path in DEPLOY.glob(pattern):
            assert path.name in names, f"deploy/{path.name} is not in CLUSTERS"


@pytest.mark.parametrize("name", ["fleet.yaml"] + [c["fleet"] for c in CLUSTERS.values()])
def test_fleet_files_pass_the_real_loader(name):
    fleet = load_fleet(DEPLOY / name, check_memory=False)
    assert len(fleet.models) >= 6
    if fleet.engine.device == "cpu":
        # On CPU the memory check runs here too: every model fits a worker's arena.
        load_fleet(DEPLOY / name, check_memory=True)
    else:
        # check_memory would resolve engine.device (cuda), which this machine may not have.
        assert fleet.engine.device.startswith("cuda")


@pytest.mark.parametrize("name", KUBERAYS)
def test_kubernetes_objects_pass_the_kubernetes_schema(name):
    for key, obj in kuberay_objects(name).items():
        if obj["apiVersion"].startswith("ray.io/"):
            continue  # not a Kubernetes type: the CRD's schema, below
        try:
            k8s_validate(obj)
        except Exception as exc:  # the schema's message, not a long traceback
            pytest.fail(f"{name}: {key}: {getattr(exc, 'message', exc)}")


@pytest.mark.parametrize("release", KUBERAY_RELEASES)
@pytest.mark.parametrize("name", KUBERAYS)
def test_rayclusters_pass_the_kuberay_crd_schema(name, release):
    (cluster,) = [o for o in kuberay_objects(name).values() if o["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    kuberay_validate(cluster, release)


@pytest.mark.parametrize("name", KUBERAYS)
def test_raycluster_pod_templates_pass_the_kubernetes_schema(name):
    for group in groups_of(raycluster(name)):
        try:
            k8s_validate_pod_template(group["template"])
        except Exception as exc:
            pytest.fail(f"{name}: {group.get('groupName', 'head')}: "
                        f"{getattr(exc, 'message', exc)}")


@pytest.mark.parametrize("name", LAUNCHERS)
def test_ray_cluster_launcher_files_pass_rays_own_checks(name):
    (config,) = load_yaml_docs(name)
    launcher_validate(config)


# ---------------------------------------------------------------------------------------------
# Command lines: `tokenpool serve` everywhere, on all interfaces


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
# Shell scripts: `bash -n`


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_commands_are_valid_bash(name):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash here")
    config = launcher(name)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        for command in config[key]:
            done = subprocess.run([bash, "-n", "-c", command], capture_output=True, text=True)
            assert done.returncode == 0, f"{key}: {command!r}: {done.stderr}"


@pytest.mark.parametrize("name", KUBERAYS)
def test_kuberay_container_scripts_are_valid_bash(name):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash here")
    for group in groups_of(raycluster(name)):
        (container,) = group["template"]["spec"]["containers"]
        assert container["command"][:2] == ["/bin/bash", "-c"]
        assert "$KUBERAY_GEN_RAY_START_CMD" in container["args"][0]
        done = subprocess.run([bash, "-n", "-c", container["args"][0]], capture_output=True,
                              text=True)
        assert done.returncode == 0, f"{container['name']}: {done.stderr}"


# ---------------------------------------------------------------------------------------------
# The image's install


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
