"""deploy/k8s: schema-valid for the oldest and newest Kubernetes the bundled schemas know, and
consistent with the server (config keys, ports, drain time, metric names) and the image."""

from __future__ import annotations

import re
import tomllib

import kubernetes_validate
import pytest

from deploy_common import (
    GRPC_PORT,
    K8S,
    METRICS_PORT,
    documented_config_keys,
    env_to_key,
    flatten,
    host_port,
    load_yaml,
    load_yaml_all,
    metric_in_sources,
)
from test_deploy_dockerfile import of, stages

# Native gRPC probes are GA since 1.27; the newest is whatever kubernetes-validate bundles.
K8S_VERSIONS = ["1.27.0", kubernetes_validate.utils.latest_version()]


def kustomization() -> dict:
    return load_yaml(K8S / "kustomization.yaml")


def manifests() -> list[tuple[str, dict]]:
    return [(f, doc) for f in kustomization()["resources"] for doc in load_yaml_all(K8S / f)]


def one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in manifests() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def deployment() -> dict:
    return one("Deployment", "s3net")


def container() -> dict:
    (c,) = deployment()["spec"]["template"]["spec"]["containers"]
    return c


def configmap_toml() -> dict:
    return tomllib.loads(one("ConfigMap", "s3net-config")["data"]["s3net.toml"])


def container_port(name: str) -> int:
    (p,) = [p["containerPort"] for p in container()["ports"] if p["name"] == name]
    return p


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version):
    docs = manifests()
    assert {d["kind"] for _, d in docs} >= {
        "Namespace", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    for f, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{f}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {e.message}")


def test_kustomization_lists_every_manifest():
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {
        "kustomization.yaml",
        "prometheus-adapter-values.yaml",  # Helm values for the adapter, not a manifest
    }
    assert listed == on_disk
    assert kustomization()["namespace"] == one("Namespace")["metadata"]["name"]


def test_configmap_toml_uses_real_config_keys_and_the_agreed_ports():
    keys = documented_config_keys()
    toml = configmap_toml()
    for key in flatten(toml):
        assert key in keys, f"ConfigMap s3net.toml: {key} is not a key of config.example.toml"
    assert host_port(toml["server"]["addr"]) == ("0.0.0.0", GRPC_PORT)
    assert host_port(toml["metrics"]["listen"]) == ("0.0.0.0", METRICS_PORT)
    assert toml["log"]["format"] == "json"


def test_container_env_uses_real_config_keys():
    keys = documented_config_keys()
    for e in container().get("env", []):
        if e["name"].startswith("S3NET__"):
            assert env_to_key(e["name"]) in keys, f"{e['name']} is not a key of config.example.toml"


def test_config_file_is_mounted_where_serve_reads_it():
    c = container()
    assert c["args"][0] == "serve"
    path = c["args"][c["args"].index("--config") + 1]
    volumes = {v["name"]: v for v in deployment()["spec"]["template"]["spec"]["volumes"]}
    mount = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mount) == 1, f"{path} is not under a volume mount"
    vol = volumes[mount[0]["name"]]
    assert vol["configMap"]["name"] == "s3net-config"
    assert path.rsplit("/", 1)[1] in one("ConfigMap", "s3net-config")["data"]


def test_probes_are_native_grpc_on_the_serving_port():
    c = container()
    assert container_port("grpc") == GRPC_PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c[probe]
        assert p["grpc"]["port"] == GRPC_PORT, probe
        # No `service`: the kubelet asks for "", which the server flips to NOT_SERVING on drain.
        assert p["grpc"].get("service", "") == "", probe
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 120, "slow first start"


def test_liveness_survives_the_drain_and_sigkill_comes_after_it():
    grace = configmap_toml()["server"]["shutdown_grace_s"]
    spec = deployment()["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > grace
    live = container()["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace


def test_one_gpu_requested_with_resources_set():
    r = container()["resources"]
    assert r["limits"]["nvidia.com/gpu"] == 1
    assert r["requests"]["nvidia.com/gpu"] == 1
    for part in ("requests", "limits"):
        assert "cpu" in r[part] and "memory" in r[part]
    toml = configmap_toml()
    assert toml["workers"]["gpu_workers_per_device"] >= 1


def test_runs_as_the_images_non_root_user():
    sc = deployment()["spec"]["template"]["spec"]["securityContext"]
    assert sc["runAsNonRoot"] is True
    (user,) = of(stages()["runtime"], "USER")
    assert str(sc["runAsUser"]) == user.split(":")[0]
    csc = container()["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in container()["volumeMounts"]}
    assert "/tmp" in mounts, "a writable /tmp with a read-only root filesystem"


def pod_labels() -> dict:
    return deployment()["spec"]["template"]["metadata"]["labels"]


def selects_the_pods(selector: dict) -> bool:
    return all(pod_labels().get(k) == v for k, v in selector.items())


def test_headless_grpc_service():
    svc = one("Service", "s3net")
    assert svc["spec"]["clusterIP"] == "None", "client-side load balancing needs every pod's IP"
    assert selects_the_pods(svc["spec"]["selector"])
    (port,) = svc["spec"]["ports"]
    assert port["port"] == GRPC_PORT and port["targetPort"] == "grpc"
    assert not svc["spec"].get("publishNotReadyAddresses", False), "draining pods must drop out"
    assert selects_the_pods(deployment()["spec"]["selector"]["matchLabels"])


def test_replicas_find_each_other_including_pods_not_ready():
    cluster = configmap_toml()["cluster"]
    (peer,) = cluster["peers"]
    host, port = host_port(peer)
    name, namespace = host.split(".")[:2]
    assert (namespace, port) == (kustomization()["namespace"], GRPC_PORT), peer
    svc = one("Service", name)
    assert svc["spec"]["clusterIP"] == "None", "the peers are every pod's own address"
    assert svc["spec"]["publishNotReadyAddresses"], "a draining pod still holds its jobs"
    assert selects_the_pods(svc["spec"]["selector"])
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["port"] == GRPC_PORT and svc_port["targetPort"] == "grpc"
    # Each pod's own address, as the peers Service lists it.
    (advertise,) = [e for e in container()["env"] if e["name"] == "S3NET__CLUSTER__ADVERTISE_ADDR"]
    assert advertise["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_metrics_are_discoverable_on_the_metrics_port():
    svc = one("Service", "s3net-metrics")
    assert svc["spec"].get("clusterIP") != "None"
    assert selects_the_pods(svc["spec"]["selector"])
    (port,) = svc["spec"]["ports"]
    assert port["port"] == METRICS_PORT and port["targetPort"] == "metrics"
    assert container_port("metrics") == METRICS_PORT
    assert host_port(configmap_toml()["metrics"]["listen"])[1] == METRICS_PORT
    for annotations in (svc["metadata"]["annotations"], deployment()["spec"]["template"]["metadata"]["annotations"]):
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(METRICS_PORT)
        assert annotations["prometheus.io/path"] == "/metrics"


def test_hpa_scales_the_deployment_on_a_metric_the_server_exports():
    hpa = one("HorizontalPodAutoscaler", "s3net")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment()["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "s3net_queue_depth"
    assert metric_in_sources(name), f"{name} is not a metric name in crates/server/src"
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


def test_prometheus_adapter_rule_exposes_the_hpa_metric():
    values = load_yaml(K8S / "prometheus-adapter-values.yaml")
    hpa_metric = one("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(hpa_metric + "{")
    assert rule["name"]["as"] == hpa_metric
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_pdb_covers_the_pods_and_never_blocks_a_single_replica():
    pdb = one("PodDisruptionBudget", "s3net")
    assert selects_the_pods(pdb["spec"]["selector"]["matchLabels"])
    assert "minAvailable" not in pdb["spec"] and pdb["spec"]["maxUnavailable"] >= 1


def test_named_callers_come_from_an_optional_secret():
    """[server.callers] from a Secret whose keys are S3NET__SERVER__CALLERS__… variables: every
    replica the same ones, and a cluster without the Secret still starts."""
    (source,) = container()["envFrom"]
    assert source["secretRef"] == {"name": "s3net-callers", "optional": True}
    # The Secret the manifest's comment shows how to make sets keys the server has.
    text = (K8S / "deployment.yaml").read_text(encoding="utf-8")
    shown = re.findall(r"(S3NET__SERVER__CALLERS__\w+)=", text)
    assert len(shown) >= 4 and any(v.endswith("__CERTIFICATE_NAMES") for v in shown), shown
    keys = documented_config_keys()
    for variable in shown:
        assert env_to_key(variable) in keys, f"{variable} is not a key of config.example.toml"


def test_caller_tokens_rotate_from_an_optional_secret_volume():
    """Token files ([server.callers.NAME].token_file) from an optional Secret mounted as a
    volume, which the kubelet updates in place, and a ConfigMap that has each pod look at its
    configuration again: a rotated token needs no new pod."""
    (volume,) = [v for v in deployment()["spec"]["template"]["spec"]["volumes"] if v["name"] == "caller-tokens"]
    assert volume["secret"]["secretName"] == "s3net-caller-tokens" and volume["secret"]["optional"] is True
    # Readable by the server's group (fsGroup), by nobody else.
    assert volume["secret"]["defaultMode"] == 0o440
    (mount,) = [m for m in container()["volumeMounts"] if m["name"] == "caller-tokens"]
    assert mount["readOnly"] is True and "subPath" not in mount, "a subPath mount is never updated"
    text = (K8S / "deployment.yaml").read_text(encoding="utf-8")
    shown = re.findall(r"S3NET__SERVER__CALLERS__(\w+)__TOKEN_FILE=(\S+)", text)
    assert shown, "the comment shows a token file"
    made = re.findall(r"create secret generic s3net-caller-tokens --from-literal=(\w+)=", text)
    for name, path in shown:
        assert path == f"{mount['mountPath']}/{name.lower()}", path
        assert name.lower() in made, (name, made)
    assert configmap_toml()["server"]["reload_interval_s"] > 0
    (config_mount,) = [m for m in container()["volumeMounts"] if m["name"] == "config"]
    assert "subPath" not in config_mount, "the ConfigMap's edits reach the pod"
