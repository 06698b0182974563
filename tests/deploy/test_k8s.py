"""deploy/k8s: every manifest valid against Kubernetes' own schemas (kubernetes-validate, offline), and consistent."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dynft.sources.kafka import parse_kafka_uri

from deploy.conftest import DEPLOY, dockerfile, final_stage, image_env, settings_from_env

K8S = DEPLOY / "k8s"
VERSION = kubernetes_validate.latest_version()  # the newest schemas the package bundles


def manifests() -> dict[str, dict[str, Any]]:
    """Every object of the base, by kind."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in yaml.safe_load_all(path.read_text()):
                assert doc["kind"] not in out, f"one {doc['kind']} only"
                out[doc["kind"]] = doc
    return out


def container() -> dict[str, Any]:
    pod = manifests()["StatefulSet"]["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    spec: dict[str, Any] = pod["containers"][0]
    return spec


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 ``add`` (all the GPU overlay uses), as kustomize applies it."""
    doc = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] == "add", op
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), op["value"])
        else:
            node[last] = op["value"]
    return doc


def test_every_manifest_is_valid_for_kubernetes_strictly() -> None:
    objects = manifests()
    assert set(objects) == {"Namespace", "ConfigMap", "Secret", "Service", "StatefulSet"}
    for obj in objects.values():
        kubernetes_validate.validate(obj, VERSION, strict=True)  # raises on any unknown or missing field


def test_the_validator_rejects_a_broken_manifest() -> None:
    broken = manifests()["StatefulSet"]
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"] == manifests()["Namespace"]["metadata"]["name"]


def test_gpu_overlay_requests_a_gpu_and_stays_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    overlay = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == [".."]
    base_image = container()["image"].split(":")[0]
    assert overlay["images"] == [{"name": base_image, "newTag": "cuda"}]
    [patch] = overlay["patches"]
    assert patch["target"] == {"kind": "StatefulSet", "name": manifests()["StatefulSet"]["metadata"]["name"]}
    ops = yaml.safe_load((K8S / "gpu" / patch["path"]).read_text())
    gpu = json_patch(manifests()["StatefulSet"], ops)
    kubernetes_validate.validate(gpu, VERSION, strict=True)
    spec = gpu["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value", "") for e in spec["containers"][0]["env"]}
    assert settings_from_env(env, monkeypatch).model.device == "cuda"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_statefulset_probes_ports_and_volumes_fit_the_image() -> None:
    objects = manifests()
    sts, service, image = objects["StatefulSet"], objects["Service"], image_env(dockerfile())
    spec = container()
    assert spec["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert spec["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert ports == {"http": int(image["DYNFT_SERVER__PORT"])}
    for probe in ("livenessProbe", "startupProbe", "readinessProbe"):
        assert spec[probe]["httpGet"]["port"] in ports
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert sts["spec"]["serviceName"] == service["metadata"]["name"] and sts["spec"]["replicas"] == 1
    mounts = {m["name"]: m["mountPath"] for m in spec["volumeMounts"]}
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]] == image["DYNFT_STATE_DIR"], "the claim holds the state dir"
    pod = sts["spec"]["template"]["spec"]
    uid = [ins.args for ins in final_stage(dockerfile()) if ins.keyword == "USER"][-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] and str(pod["securityContext"]["runAsUser"]) == uid
    assert set(spec["resources"]["requests"]) == {"cpu", "memory"}
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == image["DYNFT_SERVER__PORT"]


def test_config_map_and_secret_make_a_valid_dynft_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = manifests()
    spec, pod = container(), objects["StatefulSet"]["spec"]["template"]["spec"]
    env: dict[str, str] = {}
    for item in spec["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            secret = objects["Secret"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
            env[item["name"]] = secret["stringData"][ref["key"]]
    # DYNFT_CONFIG is a file of the ConfigMap volume.
    config_path = Path(env["DYNFT_CONFIG"])
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    mount = next(m for m in spec["volumeMounts"] if m["name"] == volume["name"])
    assert str(config_path.parent) == mount["mountPath"]
    local = tmp_path / config_path.name
    local.write_text(objects["ConfigMap"]["data"][config_path.name])
    settings = settings_from_env({**image_env(dockerfile()), **env}, monkeypatch, local)
    assert parse_kafka_uri(settings.source.uri, settings.kafka.group)[2] == "dynft"
    # The trainer and server threads fit the CPU the pod requests (the pod sees the node's cores).
    assert settings.trainer.threads >= 1
    assert settings.trainer.threads + settings.server.threads <= int(spec["resources"]["requests"]["cpu"])
    # The shipped empty token locks the admin API instead of falling back to a generated one.
    assert settings.server.admin_token is not None and settings.server.admin_token.get_secret_value() == ""
