"""deploy/k8s: every kustomization renders (``kubectl kustomize``) and validates offline
(``kubernetes-validate``), and the rendered objects obey the deployment policy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from adapters.envsettings import env_name
from server.settings import setting_fields

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
TARGETS = ["overlays/cpu", "overlays/gpu", "trainer"]
GPU = "nvidia.com/gpu"
READINESS = "loraloom.v1.Loraloom"
# Every LORALOOM_* variable is a setting (the store's included: home, database, S3).
KNOWN_VARIABLES = {env_name(item.name) for _, item in setting_fields()}


def kustomize_binary() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    command = kustomize_binary()
    if command is None:
        pytest.skip("neither kubectl nor kustomize is installed: cannot render the overlays")
    out = {}
    for target in TARGETS:
        done = subprocess.run([*command, str(K8S / target)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{target}: {done.stderr}"
        out[target] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return out


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    return [
        (doc["metadata"]["name"], doc["spec"]["template"]["spec"])
        for doc in docs
        if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")
    ]


def config_data(docs: list[dict]) -> dict[str, str]:
    maps = [
        doc for doc in of_kind(docs, "ConfigMap") if doc["metadata"]["name"].startswith("loraloom-config")
    ]
    return maps[0]["data"] if maps else {}


def test_every_kustomization_entry_exists():
    files = sorted(K8S.rglob("kustomization.yaml"))
    assert len(files) >= 4
    for path in files:
        spec = yaml.safe_load(path.read_text())
        entries = list(spec.get("resources", []))
        entries += [patch["path"] for patch in spec.get("patches", []) if "path" in patch]
        assert entries, path
        for entry in entries:
            assert (path.parent / entry).exists(), f"{path}: {entry} does not exist"


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_offline(rendered, target):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    version = latest_version()
    for doc in rendered[target]:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(
                f"{target} {doc['kind']}/{doc['metadata']['name']}: {error.message} at {list(error.path)}"
            )


@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_as_non_root_with_pinned_images(rendered, target):
    specs = pod_specs(rendered[target])
    assert specs
    for name, spec in specs:
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0, name
        for container in spec["containers"] + spec.get("initContainers", []):
            image = container["image"]
            tag = image.rsplit("/", 1)[-1]
            assert "@sha256:" in image or (":" in tag and not tag.endswith(":latest")), image
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, (name, container["name"])
            assert context.get("runAsUser", 1) != 0
            assert "ALL" in context.get("capabilities", {}).get("drop", []), (name, container["name"])
            requests = container.get("resources", {}).get("requests", {})
            assert GPU not in requests, f"{name}: {GPU} belongs in limits only"


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_server_deployment(rendered, target):
    docs = rendered[target]
    (deployment,) = of_kind(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    config = config_data(docs)
    health = int(config["LORALOOM_HEALTH_PORT"])
    assert health != int(config["LORALOOM_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health, probe
    assert container["readinessProbe"]["grpc"]["service"] == READINESS
    assert container["livenessProbe"]["grpc"].get("service", "") == ""
    assert spec["terminationGracePeriodSeconds"] > float(config["LORALOOM_GRACE_S"]) + 5
    limits = container["resources"]["limits"]
    if target.endswith("gpu"):
        assert int(limits[GPU]) >= 1 and config["LORALOOM_DEVICE"] == "cuda"
    else:
        assert GPU not in limits and config["LORALOOM_DEVICE"] == "cpu"
    for key in config:
        if key.startswith("LORALOOM_"):
            assert key in KNOWN_VARIABLES, f"{key} is read by nothing"
    # the shared store: PostgreSQL URL and S3 credentials from a Secret, the bucket from the ConfigMap
    secrets = {doc["metadata"]["name"]: doc for doc in of_kind(docs, "Secret")}
    refs = [source["secretRef"]["name"] for source in container["envFrom"] if "secretRef" in source]
    assert refs and all(ref in secrets for ref in refs)
    assert any("LORALOOM_STORE_DB_URL" in secrets[ref].get("stringData", {}) for ref in refs)
    assert config["LORALOOM_S3_BUCKET"]
    for volume in spec["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["secretName"] in secrets
    # Service, PDB and HPA select / target this Deployment's pods
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (service,) = of_kind(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= {
        p["name"] for p in container["ports"]
    }
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "loraloom_queue_depth"


def test_trainer_job_registers_into_the_shared_store(rendered):
    (job,) = of_kind(rendered["trainer"], "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "train" and "--store" in args and "--name" in args
    assert {"loraloom-config", "loraloom-store"} <= {
        (source.get("configMapRef") or source.get("secretRef"))["name"] for source in container["envFrom"]
    }
    assert int(container["resources"]["limits"][GPU]) == 1
