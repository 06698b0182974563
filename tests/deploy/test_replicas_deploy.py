"""deploy/k8s/replicas and Compose's `replicas` profile: valid, and wired to the trainer's versions topic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dynft.replication.follower import parse_follow_uri
from dynft.sources.kafka import parse_kafka_uri

from deploy.conftest import DEPLOY, dockerfile, image_env, settings_from_env
from deploy.test_k8s import VERSION, json_patch, manifests

REPLICAS = DEPLOY / "k8s" / "replicas"


def overlay_objects() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((REPLICAS / "kustomization.yaml").read_text())
    out: dict[str, dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        if resource != "..":
            doc = yaml.safe_load((REPLICAS / resource).read_text())
            out[doc["kind"]] = doc
    return out


def trainer_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """The base StatefulSet's settings with the overlay's patch applied (the ConfigMap as its file)."""
    kustomization = yaml.safe_load((REPLICAS / "kustomization.yaml").read_text())
    [patch] = kustomization["patches"]
    sts = json_patch(manifests()["StatefulSet"], yaml.safe_load((REPLICAS / patch["path"]).read_text()))
    kubernetes_validate.validate(sts, VERSION, strict=True)
    env = {e["name"]: e["value"] for e in sts["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    config = tmp_path / "dynft.toml"
    config.write_text(manifests()["ConfigMap"]["data"]["dynft.toml"])
    return settings_from_env({**image_env(dockerfile()), **env}, monkeypatch, config)


def test_replica_manifests_are_valid_and_select_the_replicas() -> None:
    objects = overlay_objects()
    assert set(objects) == {"Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"}
    for obj in objects.values():
        kubernetes_validate.validate(obj, VERSION, strict=True)
    deployment = objects["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert objects["Service"]["spec"]["selector"].items() <= pod_labels.items()
    # The base Service keeps pointing at the trainer's pod only, the replicas' at the replicas only.
    trainer_labels = manifests()["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    assert not objects["Service"]["spec"]["selector"].items() <= trainer_labels.items()
    assert not manifests()["Service"]["spec"]["selector"].items() <= pod_labels.items()
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert objects["PodDisruptionBudget"]["spec"]["minAvailable"] < hpa["minReplicas"] <= hpa["maxReplicas"]


def test_replicas_follow_the_topic_the_trainer_writes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    trainer = trainer_settings(monkeypatch, tmp_path)
    container = overlay_objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["dynft", "serve", "--follow"]
    servers, topic = parse_follow_uri(container["command"][3])
    assert topic == trainer.kafka.versions_topic
    assert servers == parse_kafka_uri(trainer.source.uri, trainer.kafka.group)[0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(image_env(dockerfile())["DYNFT_SERVER__PORT"])}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["state"] == image_env(dockerfile())["DYNFT_STATE_DIR"]


def test_compose_replicas_profile_follows_the_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    trainer = settings_from_env({**image_env(dockerfile()), **services["dynft"]["environment"]}, monkeypatch)
    replicas = {name: s for name, s in services.items() if "replicas" in s.get("profiles", [])}
    assert sorted(replicas) == ["replica1", "replica2"]
    host_ports = set()
    for replica in replicas.values():
        assert replica["image"] == services["dynft"]["image"]
        assert replica["entrypoint"][:3] == ["dynft", "serve", "--follow"]
        servers, topic = parse_follow_uri(replica["entrypoint"][3])
        assert topic == trainer.kafka.versions_topic
        assert servers == parse_kafka_uri(trainer.source.uri, trainer.kafka.group)[0]
        assert "volumes" not in replica, "a replica shares nothing with the trainer but the broker"
        host_ports.add(replica["ports"][0].rsplit(":", 2)[1])
    assert len(host_ports) == 2
