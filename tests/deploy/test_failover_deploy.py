"""deploy/k8s/failover and sharded: valid, trainer pods of one configuration with the election on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dynft.election import Election

from deploy.conftest import DEPLOY, dockerfile, image_env, settings_from_env
from deploy.test_k8s import VERSION, json_patch, manifests

FAILOVER = DEPLOY / "k8s" / "failover"
REPLICAS = DEPLOY / "k8s" / "replicas"
SHARDED = DEPLOY / "k8s" / "sharded"


def patched_statefulset(*overlays: Path) -> dict[str, Any]:
    """The base StatefulSet with each overlay's patches in turn (default: replicas, then failover)."""
    sts = manifests()["StatefulSet"]
    for overlay in overlays or (REPLICAS, FAILOVER):
        for patch in yaml.safe_load((overlay / "kustomization.yaml").read_text())["patches"]:
            assert patch["target"] == {"kind": "StatefulSet", "name": sts["metadata"]["name"]}
            sts = json_patch(sts, yaml.safe_load((overlay / patch["path"]).read_text()))
    return sts


def test_the_failover_overlay_runs_two_electing_trainers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kustomization = yaml.safe_load((FAILOVER / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../replicas"]
    sts = patched_statefulset()
    kubernetes_validate.validate(sts, VERSION, strict=True)
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["volumeClaimTemplates"], "each trainer pod keeps its own volume: no shared disk"
    env = {e["name"]: e["value"] for e in sts["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    config = tmp_path / "dynft.toml"
    config.write_text(manifests()["ConfigMap"]["data"]["dynft.toml"])
    settings = settings_from_env({**image_env(dockerfile()), **env}, monkeypatch, config)
    assert settings.kafka.election and settings.kafka.versions_topic == "dynft.versions"
    election = Election(settings, "pod-0")  # no ConfigError: a kafka:// source and a versions topic
    assert election.topic == "dynft.versions.term"


def test_the_sharded_overlay_runs_four_trainers_that_split_the_partitions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kustomization = yaml.safe_load((SHARDED / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../failover"]
    sts = patched_statefulset(REPLICAS, FAILOVER, SHARDED)
    kubernetes_validate.validate(sts, VERSION, strict=True)
    assert sts["spec"]["replicas"] == 4
    env = {e["name"]: e["value"] for e in sts["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    config = tmp_path / "dynft.toml"
    config.write_text(manifests()["ConfigMap"]["data"]["dynft.toml"])
    settings = settings_from_env({**image_env(dockerfile()), **env}, monkeypatch, config)
    assert settings.kafka.election and settings.kafka.sharded
    assert Election(settings, "pod-0").topic == "dynft.versions.shards"
