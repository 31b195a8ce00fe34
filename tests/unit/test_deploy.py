"""The deployment files: cluster.yaml through Ray's own config validation, the KubeRay RayJob's
structure, and for both: every resource the jobs in deploy/jobs/ ask for exists on a node type,
training only where the accelerator is. No cluster is started here (see test_cluster.py)."""

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from ray_jobs.cli import JOBS
from ray_jobs.cluster import node_capacity
from ray_jobs.config import EmbedConfig, PublishConfig, ServeConfig, TrainConfig, parse_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
RAYJOB_YAML = REPO / "deploy" / "kuberay" / "rayjob.yaml"
RAYSERVICE_YAML = REPO / "deploy" / "kuberay" / "rayservice.yaml"
IMAGE = re.compile(r"rayproject/ray:2\.60\.\d+-py311-gpu")
PIN = re.compile(r"vae-feast(?:\.git@|/archive/)([0-9a-f]{40})\b")


def fits(request: dict[str, float], node: dict[str, float]) -> bool:
    return node_capacity(request, [node]) >= 1  # the jobs' own capacity rule, for one node


def deploy_config(config_class, name: str):
    return parse_config(config_class, ["--config", str(REPO / "deploy" / "jobs" / f"{name}.yaml")], prog=name)


def assert_jobs_fit(node_types: dict[str, dict[str, float]]) -> None:
    """The requests of deploy/jobs/*.yaml, computed by the jobs' own functions, against node types'
    resources."""
    train = deploy_config(TrainConfig, "train").worker_request()
    embed = deploy_config(EmbedConfig, "embed")
    publish = deploy_config(PublishConfig, "publish").writer_request()
    gpu_types = {name for name, resources in node_types.items() if resources.get("GPU", 0) >= 1}
    cpu_types = set(node_types) - gpu_types

    training_types = {name for name, resources in node_types.items() if fits(train, resources)}
    assert training_types, f"no node type holds a training worker {train}"
    assert training_types <= gpu_types, (
        f"training could land on {training_types - gpu_types}, which have no GPU"
    )
    assert train.get("GPU", 0) >= 1 and any(name.startswith("accelerator_type:") for name in train)
    assert any(fits(embed.encoder_request(cluster_has_gpus=True), node_types[name]) for name in gpu_types)
    assert any(fits(embed.encoder_request(cluster_has_gpus=False), node_types[name]) for name in cpu_types)
    assert "GPU" not in publish and any(fits(publish, node_types[name]) for name in cpu_types)


def pinned_commits(text: str) -> set[str]:
    return set(PIN.findall(text))


def assert_commit_exists(commit: str) -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    found = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"], check=False, capture_output=True
    )
    assert found.returncode == 0, f"the pinned revision {commit} is not a commit of this repository"


# --- cluster.yaml ---------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_own_validation_and_a_broken_one_does_not():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` runs before it touches AWS

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5  # resources must be integers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_cluster_yaml_has_the_promised_shape():
    text = CLUSTER_YAML.read_text()
    config = yaml.safe_load(text)
    assert config["provider"]["type"] == "aws"
    assert IMAGE.fullmatch(config["docker"]["image"])
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must run no tasks or actors (no training)"
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [
        name
        for name, t in types.items()
        if name != config["head_node_type"] and not t["resources"].get("GPU")
    ]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in gpu), (
        "GPU workers scale from zero"
    )
    assert cpu, "a CPU worker type for Ray Data"

    # S3 through instance profiles, never keys; the dashboard only through the SSH tunnel.
    for name, node_type in types.items():
        if name != config["head_node_type"]:
            assert "IamInstanceProfile" in node_type["node_config"], name
    assert not re.search(r"aws_access_key|aws_secret|secret_access|AKIA[0-9A-Z]{12}", text, re.IGNORECASE)
    assert "aws_credentials" not in config["provider"] and "security_group" not in config["provider"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--include-dashboard=false" not in head_start

    # The project at a pinned commit.
    setup = " ".join(config["setup_commands"])
    commits = pinned_commits(setup)
    assert len(commits) == 1, f"setup_commands must install this project at one pinned commit: {setup}"
    assert_commit_exists(commits.pop())


def test_every_resource_the_jobs_ask_for_exists_on_a_cluster_yaml_node_type():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert_jobs_fit({name: t["resources"] for name, t in config["available_node_types"].items()})


def test_the_fit_check_catches_a_job_no_node_type_can_run():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    node_types = [t["resources"] for t in config["available_node_types"].values()]
    train = deploy_config(TrainConfig, "train").model_copy(update={"accelerator_type": "H100"})
    assert not any(fits(train.worker_request(), resources) for resources in node_types)
    embed = deploy_config(EmbedConfig, "embed").model_copy(update={"cpus_per_encoder": 32})
    assert not any(fits(embed.encoder_request(cluster_has_gpus=False), resources) for resources in node_types)


def test_the_production_feature_store_yaml_is_a_valid_feast_config(monkeypatch):
    from feast.repo_config import load_repo_config

    from feast_embeddings.settings import StoreSettings

    monkeypatch.setenv("REDIS_CONNECTION_STRING", "redis.example:6379,password=x")
    monkeypatch.setenv("PGUSER", "vae")
    monkeypatch.setenv("PGHOST", "catalog.internal")
    config = load_repo_config(REPO / "feature_repo", REPO / "deploy" / "feature_store.yaml")
    assert config.registry.path.startswith("s3://") and config.online_store.type == "redis"
    assert (
        config.project
        == load_repo_config(REPO / "feature_repo", REPO / "feature_repo" / "feature_store.yaml").project
    )
    publish = deploy_config(PublishConfig, "publish")
    assert (REPO / publish.feature_store_yaml).resolve() == REPO / "deploy" / "feature_store.yaml"
    assert (publish.monitoring or "").startswith("s3://")
    # the embeddings catalog every job and reader shares: PostgreSQL (no password in it), tables on S3
    catalog, warehouse = StoreSettings.read(REPO / "deploy" / "feature_store.yaml").embeddings_catalog()
    assert catalog == "postgresql+psycopg2://vae@catalog.internal:5432/vae_catalog"
    assert warehouse.startswith("s3://")
    embed = deploy_config(EmbedConfig, "embed")
    assert (REPO / embed.feature_store_yaml).resolve() == REPO / "deploy" / "feature_store.yaml"


# --- KubeRay --------------------------------------------------------------------------------------


def group_resources(group: dict) -> dict[str, float]:
    """The Ray resources of a KubeRay group's pod: CPU and GPU from its limits, the rest from
    rayStartParams."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = group["rayStartParams"]
    resources = {
        "CPU": float(params.get("num-cpus", limits["cpu"])),
        "GPU": float(limits.get("nvidia.com/gpu", 0)),
    }
    if "resources" in params:  # KubeRay's quoting: a JSON string inside a string
        resources |= json.loads(json.loads(params["resources"]))
    return resources


def test_kuberay_rayjob_structure():
    import ray

    job = yaml.safe_load(RAYJOB_YAML.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}
    assert spec["shutdownAfterJobFinishes"] is True

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must run no tasks or actors"
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    for group in [head, *groups.values()]:
        for container in group["template"]["spec"]["containers"]:
            assert IMAGE.fullmatch(container["image"])
            assert "AWS_SECRET_ACCESS_KEY" not in {env["name"] for env in container.get("env", [])}
    gpu_groups = [g for g in groups.values() if group_resources(g)["GPU"] >= 1]
    assert gpu_groups and all(g["minReplicas"] == 0 and g["maxReplicas"] > 0 for g in gpu_groups)
    assert_jobs_fit({name: group_resources(group) for name, group in groups.items()})

    # runtimeEnvYAML: the code and its dependencies at the commit cluster.yaml pins.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) >= {"working_dir", "pip"}
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")  # the registry of record
    commits = pinned_commits(spec["runtimeEnvYAML"])
    assert commits == pinned_commits(CLUSTER_YAML.read_text()) and len(commits) == 1

    # The entrypoint: vaectl jobs whose options parse with the jobs' own config classes.
    steps = [shlex.split(step) for step in spec["entrypoint"].split("&&")]
    assert [step[3] for step in steps] == ["train", "embed", "publish"]
    for step in steps:
        assert step[:3] == ["python", "-m", "ray_jobs.cli"]
        arguments = [a.replace("deploy/", f"{REPO}/deploy/") for a in step[4:]]
        parse_config(JOBS[step[3]].config, arguments, prog=step[3])


def manifest_keys(cluster: dict) -> set[str]:
    """The manifest key variables of a cluster's containers, removed from them (the rest compares equal)."""
    found = set()
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            env = container.get("env", [])
            found |= {v["name"] for v in env if v["name"].startswith("VAE_MANIFEST_")}
            container["env"] = [v for v in env if not v["name"].startswith("VAE_MANIFEST_")]
    return found


def test_kuberay_rayservice_runs_the_encoding_service_on_the_rayjobs_cluster():
    """The RayService: the RayJob's reviewed cluster, the same pinned commit, and a Serve application whose
    import path is the service's builder and whose config parses with the service's own config class."""
    import importlib

    service = yaml.safe_load(RAYSERVICE_YAML.read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    reviewed = yaml.safe_load(RAYJOB_YAML.read_text())["spec"]["rayClusterSpec"]
    # the same cluster but for one key: the replicas hold the manifest's verifying key, not the signing one
    service_keys = manifest_keys(service["spec"]["rayClusterConfig"])
    assert service_keys == {"VAE_MANIFEST_VERIFY_KEY"} and manifest_keys(reviewed) == {
        "VAE_MANIFEST_SIGNING_KEY"
    }
    assert service["spec"]["rayClusterConfig"] == reviewed
    assert pinned_commits(RAYSERVICE_YAML.read_text()) == pinned_commits(CLUSTER_YAML.read_text())

    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, builder = application["import_path"].partition(":")
    from ray.serve import Application

    built = getattr(importlib.import_module(module), builder)(
        {"config": str(REPO / "deploy/jobs/serve.yaml")}
    )
    assert isinstance(built, Application)
    config = deploy_config(ServeConfig, "serve")
    assert application["args"] == {"config": "deploy/jobs/serve.yaml"}
    assert application["route_prefix"] == f"/{config.entity}" and config.write
    assert config.feature_store_yaml == "deploy/feature_store.yaml"
    cpu_nodes = [group_resources(g) for g in reviewed["workerGroupSpecs"] if not group_resources(g)["GPU"]]
    assert any(fits({"CPU": config.cpus_per_replica}, node) for node in cpu_nodes)
    runtime = application["runtime_env"]
    assert runtime["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http") and set(runtime) >= {
        "working_dir",
        "pip",
    }


CRONJOB_YAML = REPO / "deploy" / "kuberay" / "pipeline-cronjob.yaml"


def test_every_variable_the_production_store_names_reaches_every_ray_container():
    """The variables deploy/feature_store.yaml expands (${...}) plus PGPASSWORD (libpq reads it): set in
    every container of the RayJob's cluster (the head runs the drivers, the workers open the store) or in
    the runtime env's env_vars, for the hand-run RayJob and the CronJob's daily one alike."""
    named = set(re.findall(r"\$\{(\w+)\}", (REPO / "deploy" / "feature_store.yaml").read_text()))
    assert named >= {"REDIS_CONNECTION_STRING", "PGUSER", "PGHOST", "MLFLOW_TRACKING_URI"}
    needed = named | {"PGPASSWORD"}
    configmap = next(d for d in yaml.safe_load_all(CRONJOB_YAML.read_text()) if d["kind"] == "ConfigMap")
    for spec in (
        yaml.safe_load(RAYJOB_YAML.read_text())["spec"],
        yaml.safe_load(configmap["data"]["rayjob.yaml"])["spec"],
    ):
        runtime = set(yaml.safe_load(spec["runtimeEnvYAML"]).get("env_vars", {}))
        cluster = spec["rayClusterSpec"]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                env = {variable["name"]: variable for variable in container.get("env", [])}
                missing = needed - set(env) - runtime
                assert not missing, f"{container['name']} lacks {missing}"
                assert "value" not in env["PGPASSWORD"], "the password comes from a secret, not the manifest"


def test_pipeline_cronjob_creates_the_days_rayjob_on_the_reviewed_cluster():
    from ray_jobs.config import PipelineConfig

    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(CRONJOB_YAML.read_text())}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    cron = docs["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid", "two schedulers at once would race for the day"
    assert re.fullmatch(r"\d+ \d+ \* \* \*", cron["schedule"]), "once a day"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == docs["ServiceAccount"]["metadata"]["name"]
    (rule,) = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"] and "create" in rule["verbs"]
    (container,) = pod["containers"]
    script = container["args"][0]
    assert "__DAY__" in script and "/template/rayjob.yaml" in script
    volume = pod["volumes"][0]["configMap"]["name"]
    assert volume == docs["ConfigMap"]["metadata"]["name"]

    # The day's RayJob: the reviewed cluster of rayjob.yaml, the same pinned commit, one pipeline step.
    day = "2026-11-23"
    rayjob = yaml.safe_load(docs["ConfigMap"]["data"]["rayjob.yaml"].replace("__DAY__", day))
    assert rayjob["kind"] == "RayJob" and rayjob["metadata"]["name"].endswith(day)
    reviewed = yaml.safe_load(RAYJOB_YAML.read_text())["spec"]
    assert rayjob["spec"]["rayClusterSpec"] == reviewed["rayClusterSpec"]
    assert pinned_commits(rayjob["spec"]["runtimeEnvYAML"]) == pinned_commits(CLUSTER_YAML.read_text())
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert runtime_env["pip"] == yaml.safe_load(reviewed["runtimeEnvYAML"])["pip"]
    assert runtime_env["env_vars"]["PUSHGATEWAY_URL"].startswith("http")
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")  # the registry of record
    command = shlex.split(rayjob["spec"]["entrypoint"])
    assert command[:4] == ["python", "-m", "ray_jobs.cli", "pipeline"]
    arguments = [a.replace("deploy/", f"{REPO}/deploy/") for a in command[4:]]
    config = parse_config(PipelineConfig, arguments, prog="pipeline")
    assert config.batch == day and config.data.endswith(f"date={day}/")
    assert config.exit_codes is False, "the RayJob fails only when the step fails; decisions go to Prometheus"
    train = config.train
    assert train.gpus_per_worker >= 1 and train.storage_path.startswith("s3://")


def test_the_deployed_servers_authenticate_every_caller(monkeypatch):
    """Feast's server: OIDC and the repo's permissions, the intra-server bypass never set; consumers'
    client config: tokens from their own client credentials; MLflow: the basic-auth app, no access
    without a user."""
    from feast.permissions.auth_model import OidcAuthConfig, OidcClientAuthConfig
    from feast.repo_config import load_repo_config

    for name, value in {"REDIS_CONNECTION_STRING": "r:6379", "PGUSER": "vae", "PGHOST": "db"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OIDC_DISCOVERY_URL", "https://sso.example/.well-known/openid-configuration")
    server = load_repo_config(REPO / "feature_repo", REPO / "deploy" / "feature_store.yaml").auth_config
    assert isinstance(server, OidcAuthConfig) and server.auth_discovery_url.startswith("https://sso.example")
    assert server.client_id == "vae-embeddings"
    assert load_repo_config(REPO / "feature_repo", REPO / "feature_repo" / "feature_store.yaml").auth == {
        "type": "no_auth"
    }  # the laptop default, which says so where it is configured

    deployment, _ = yaml.safe_load_all((REPO / "deploy" / "feast" / "feature-server.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["args"])
    assert "-f deploy/feature_store.yaml serve" in command
    assert pinned_commits(command) == pinned_commits(CLUSTER_YAML.read_text())
    env = {v["name"] for v in container["env"]}
    named = set(re.findall(r"\$\{(\w+)\}", (REPO / "deploy" / "feature_store.yaml").read_text()))
    assert named - {"MLFLOW_TRACKING_URI"} <= env and "INTRA_COMMUNICATION_BASE64" not in env

    monkeypatch.setenv("OIDC_CLIENT_ID", "ranker")
    monkeypatch.setenv("OIDC_CLIENT_SECRET", "s")
    consumer = load_repo_config(REPO / "feature_repo", REPO / "deploy" / "consumer_feature_store.yaml")
    assert isinstance(consumer.auth_config, OidcClientAuthConfig) and consumer.online_store.type == "remote"

    config_map, mlflow, _ = yaml.safe_load_all(
        (REPO / "deploy" / "mlflow" / "mlflow-server.yaml").read_text()
    )
    assert "default_permission = NO_PERMISSIONS" in config_map["data"]["basic_auth.ini"]
    (container,) = mlflow["spec"]["template"]["spec"]["containers"]
    assert "--app-name basic-auth" in " ".join(container["args"])
    secrets = {v["name"] for v in container["env"] if "secretKeyRef" in v.get("valueFrom", {})}
    assert {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= secrets
