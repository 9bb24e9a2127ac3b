"""deploy/k8s against the Kubernetes API's JSON schemas in strict mode (unknown fields
are errors), offline, with the schemas the pinned kubernetes-validate wheel ships; then
what a schema cannot know: selectors that select, probes on the ports the processes
listen on, resources, the engine's replicas against its input's partitions, scrape
labels that match the Prometheus config and the alert rules, EARN_* variables the
processes really read (here and in docker-compose.yml), and mTLS: every workload mounts
its identity's certificate secret read-only at EARN_TLS_DIR and sets EARN_TLS_IDENTITY,
and the secrets' documented recipe is the project's issuer."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from services.devstack.processes import PROCESSES
from services.kernel.config import REPO_ROOT, ServiceSettings, Settings
from services.kernel.grpcserver import IDENTITY_ROLES
from services.kernel.tls import deployment_names
from services.kernel.topics import CATALOGUE
from tests.deploy.tools import DEMO_ONLY, DEPLOY, deployed_processes, load_yaml, load_yaml_all, scraped_jobs

K8S = DEPLOY / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
# The oldest and the newest Kubernetes minor the manifests are checked against.
VERSIONS = ("1.30.0", "1.37.0")
# Every deployed process of PROCESSES is a workload scraped as its job; the demo's
# simulators are not deployed here (compose's `demo` profile only; README: Operating it).
JOBS = scraped_jobs()
GRPC = {spec.name for spec in deployed_processes() if spec.port_env}


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{path.name}: {doc['kind']} {doc['metadata']['name']}", doc) for path in MANIFESTS for doc in load_yaml_all(path)]


def workloads() -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] in ("Deployment", "StatefulSet")]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_follow_the_api_schemas(version: str) -> None:
    failures = []
    for where, doc in documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            failures.append(f"{where}: {'/'.join(map(str, err.path))}: {err.message}")
    assert not failures, "\n".join(failures)


def test_the_schema_check_catches_mistakes() -> None:
    (_, wallet), *_ = [(w, d) for w, d in documents() if d["kind"] == "Deployment"]
    wallet["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wallet, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest_in_one_namespace() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]
    for where, doc in documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization["namespace"], where


def test_selectors_select_and_services_reach_ports() -> None:
    templates = {w["metadata"]["name"]: w["spec"]["template"] for w in workloads()}
    for workload in workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for where, doc in documents():
        if doc["kind"] == "Service":
            selected = [name for name, t in templates.items() if doc["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
            assert len(selected) == 1, where
            ports = {p["name"] for c in templates[selected[0]]["spec"]["containers"] for p in c["ports"]}
            assert {p["targetPort"] for p in doc["spec"]["ports"]} <= ports, where
        if doc["kind"] == "PodDisruptionBudget":
            assert any(doc["spec"]["selector"]["matchLabels"].items() <= t["metadata"]["labels"].items() for t in templates.values())


def test_every_container_has_probes_resources_and_runs_unprivileged() -> None:
    for workload in workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in containers(workload):
            name = f"{workload['metadata']['name']}/{container['name']}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{name} has no {probe}"
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), name
            assert "memory" in container["resources"]["limits"], name
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert "/tmp" in {m["mountPath"] for m in container.get("volumeMounts", [])}, f"{name}: no writable /tmp"


def test_grpc_services_are_probed_on_the_grpc_health_service_of_their_port() -> None:
    grpc_services = 0
    for workload in workloads():
        for container in containers(workload):
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            if "grpc" not in ports:
                continue
            grpc_services += 1
            assert env_of(container)["EARN_GRPC_PORT"] == str(ports["grpc"])
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                # The kubelet's own gRPC probe speaks plaintext: the kernel's check speaks mTLS.
                where = f"{workload['metadata']['name']} {probe}"
                assert "grpc" not in container[probe], where
                assert container[probe]["exec"]["command"] == [
                    "python", "-m", "services.kernel.healthcheck", f"localhost:{ports['grpc']}"], where
                assert container[probe]["timeoutSeconds"] >= 3, where
    assert grpc_services == len(GRPC)  # every gRPC process of PROCESSES but the demo's


def test_every_process_is_scraped_as_its_prometheus_job() -> None:
    config = load_yaml(K8S / "config.yaml")["data"]
    jobs = set()
    for workload in workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "earn-platform"
        jobs.add(labels["earn-platform/job"])
        (container,) = containers(workload)
        metrics = [p for p in container["ports"] if p["name"] == "metrics"]
        assert metrics and str(metrics[0]["containerPort"]) == config["EARN_METRICS_PORT"]
    assert jobs == JOBS
    assert jobs >= {"wallet", "simple_earn", "launchpool", "candydrop", "market", "dual", "leverage", "accrual", "scheduler"}
    assert not jobs & DEMO_ONLY, "the demo's simulators are not deployed on Kubernetes"
    assert config["EARN_METRICS_HOST"] == "0.0.0.0" and config["EARN_GRPC_HOST"] == "0.0.0.0"
    relabel = load_yaml(DEPLOY / "prometheus" / "prometheus-k8s.yml")["scrape_configs"][0]["relabel_configs"]
    kept = {r["source_labels"][0]: r["regex"] for r in relabel if r.get("action") == "keep"}
    assert kept == {"__meta_kubernetes_pod_label_app_kubernetes_io_part_of": "earn-platform",
                    "__meta_kubernetes_pod_container_port_name": "metrics"}
    assert {"source_labels": ["__meta_kubernetes_pod_label_earn_platform_job"], "target_label": "job"} in relabel


def test_engine_replicas_fit_the_partitions_of_its_inputs() -> None:
    (engine,) = [w for w in workloads() if w["metadata"]["name"] == "accrual"]
    assert engine["kind"] == "StatefulSet"
    replicas = engine["spec"]["replicas"]
    for topic in ("simple_earn.accrual", "launchpool.accrual", "loan.ltv"):  # the engine's inputs
        partitions = CATALOGUE[topic].partitions
        assert 1 <= replicas <= partitions and partitions % replicas == 0, f"{replicas} workers for {partitions} partitions of {topic}"


def test_every_workload_runs_its_process_and_calls_by_earn_config() -> None:
    config = load_yaml(K8S / "config.yaml")["data"]
    modules = {spec.name: spec.module for spec in PROCESSES}
    for workload in workloads():
        job = workload["spec"]["template"]["metadata"]["labels"]["earn-platform/job"]
        (container,) = containers(workload)
        assert container["command"] == ["python", "-m", modules[job]], job
    services = {doc["metadata"]["name"]: doc for _, doc in documents() if doc["kind"] == "Service"}
    for product in ("wallet", "simple_earn", "market", "launchpool", "candydrop", "dual", "leverage", "loan"):
        host, port = config[f"EARN_{product.upper()}_ADDRESS"].split(":")
        name = host.split(".")[0]
        assert host == f"{name}.{kustomization_namespace()}.svc", product
        assert int(port) in {p["port"] for p in services[name]["spec"]["ports"]}, product


def kustomization_namespace() -> str:
    return load_yaml(K8S / "kustomization.yaml")["namespace"]


def _known_variables() -> set[str]:
    from services.accrual.app import AccrualSettings
    from services.candydrop.generator import GeneratorSettings
    from services.candydrop.main import CandyDropSettings
    from services.dual.main import DualSettings
    from services.launchpool.main import LaunchpoolSettings
    from services.leverage.api import LeverageSettings
    from services.loan.api import LoanSettings
    from services.market.main import MarketSettings
    from services.market.simulator import SimulatorSettings
    from services.scheduler.jobs import SchedulerSettings
    from services.simple_earn.main import SimpleEarnSettings
    from services.wallet.main import WalletSettings

    known = set()
    for cls in (Settings, ServiceSettings, WalletSettings, SimpleEarnSettings, AccrualSettings, SchedulerSettings,
                LaunchpoolSettings, CandyDropSettings, GeneratorSettings, MarketSettings, SimulatorSettings,
                DualSettings, LeverageSettings, LoanSettings):
        for name, field in cls.model_fields.items():
            alias = field.validation_alias
            known.add(alias if isinstance(alias, str) else f"EARN_{name.upper()}")
    return known


def _variables(mapping: dict[str, Any], where: str) -> list[tuple[str, str]]:
    return [(name, where) for name in mapping if name.startswith("EARN_")]


def test_every_earn_variable_set_is_one_a_process_reads() -> None:
    """The settings ignore unknown EARN_* variables, so a misspelt one would be lost silently."""
    found = _variables(load_yaml(K8S / "config.yaml")["data"], "config.yaml")
    for workload in workloads():
        for container in containers(workload):
            found += _variables(env_of(container), workload["metadata"]["name"])
    compose: dict[str, Any] = load_yaml(REPO_ROOT / "docker-compose.yml")
    for name, service in compose["services"].items():
        found += _variables(service.get("environment") or {}, f"docker-compose.yml {name}")
    known = _known_variables()
    unknown = sorted({f"{name} ({where})" for name, where in found if name not in known})
    assert not unknown, unknown



TLS_DIR = "/etc/earn/tls"


def test_every_workload_mounts_its_certificate_secret_and_names_its_identity() -> None:
    config = load_yaml(K8S / "config.yaml")["data"]
    assert config["EARN_TLS_DIR"] == TLS_DIR
    seen = set()
    for workload in workloads():
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        identity = workload["spec"]["template"]["metadata"]["labels"]["earn-platform/job"]
        assert identity in IDENTITY_ROLES, name
        secret = f"earn-tls-{identity.replace('_', '-')}"
        (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
        assert volume["secret"]["secretName"] == secret, name
        # Readable by the process (group fsGroup), not by others.
        assert volume["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"], name
        assert "items" not in volume["secret"], name  # ca.pem, <identity>.pem, <identity>.key as created
        (container,) = containers(workload)
        assert {"name": "tls", "mountPath": TLS_DIR, "readOnly": True} in container["volumeMounts"], name
        assert env_of(container)["EARN_TLS_IDENTITY"] == identity, name
        assert {"configMapRef": {"name": "earn-config"}} in container["envFrom"], name  # EARN_TLS_DIR
        seen.add(identity)
    assert seen == JOBS  # every deployed process, gRPC server or not, talks mTLS


def test_callers_dial_names_the_server_certificates_carry() -> None:
    config = load_yaml(K8S / "config.yaml")["data"]
    namespace = kustomization_namespace()
    for variable, value in config.items():
        if variable.endswith("_ADDRESS"):
            host = value.split(":")[0]
            identity = variable.removeprefix("EARN_").removesuffix("_ADDRESS").lower()
            assert host in deployment_names(identity, [f"{namespace}.svc"]), variable


def test_the_documented_secret_recipe_uses_the_projects_issuer() -> None:
    text = (K8S / "config.yaml").read_text()
    namespace = kustomization_namespace()
    assert f"python -m services.kernel.tls ./earn-certs --domain {namespace}.svc" in text
    assert 'create secret generic "earn-tls-${id//_/-}" --from-file="./earn-certs/$id/"' in text
    (line,) = [line for line in text.splitlines() if line.startswith("#   for id in ")]
    assert set(line.removeprefix("#   for id in ").removesuffix("; do").split()) == JOBS
