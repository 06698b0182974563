"""deploy/prometheus against the real Prometheus: promtool checks, a live scrape of `dynft run`, the alerts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from deploy.conftest import DEPLOY, Daemon, Prometheus

PROMETHEUS = DEPLOY / "prometheus"
ALERTS = {
    "DynftDown",
    "DynftNotReady",
    "DynftNoEvents",
    "DynftKafkaLagGrowing",
    "DynftAccuracyLow",
    "DynftWorseThanMajorityClass",
    "DynftAdaptersRejected",
    "DynftSwapFailures",
    "DynftRestarting",
}


def promtool_run(promtool: str, *args: str, stdin: bytes | None = None, cwd: Path = PROMETHEUS) -> tuple[int, str]:
    done = subprocess.run([promtool, *args], input=stdin, capture_output=True, cwd=cwd, timeout=60)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


def test_promtool_accepts_the_shipped_config_and_rules(promtool: str) -> None:
    code, out = promtool_run(promtool, "check", "config", "prometheus.yml")
    assert code == 0 and "SUCCESS: prometheus.yml is valid" in out and "SUCCESS: 1 rule files found" in out, out
    code, out = promtool_run(promtool, "check", "rules", "alerts.yml")
    assert code == 0 and f"SUCCESS: {len(ALERTS)} rules found" in out, out


def test_alert_rules_pass_their_unit_tests(promtool: str) -> None:
    """alerts_test.yml makes each alert fire on a synthetic problem and stay quiet on a healthy daemon."""
    code, out = promtool_run(promtool, "test", "rules", "alerts_test.yml")
    assert code == 0 and "SUCCESS" in out, out
    tested = {
        case["alertname"]
        for test in yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == ALERTS, "every alert has a case where it fires"


def test_promtool_fails_on_what_it_should(promtool: str, tmp_path: Path) -> None:
    """The checks above can fail: a broken rule, an alert whose expected firing is wrong, a bad exposition."""
    (tmp_path / "rules.yml").write_text("groups:\n- name: x\n  rules:\n  - alert: X\n    expr: sum(rate(x[5m])\n")
    code, out = promtool_run(promtool, "check", "rules", "rules.yml", cwd=tmp_path)
    assert code != 0 and "unclosed left parenthesis" in out, out
    (tmp_path / "alerts.yml").write_text((PROMETHEUS / "alerts.yml").read_text().replace("< 0.6", "< 0.3"))
    (tmp_path / "alerts_test.yml").write_text((PROMETHEUS / "alerts_test.yml").read_text())
    code, out = promtool_run(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert code != 0 and "alertname: DynftAccuracyLow" in out, out
    code, out = promtool_run(promtool, "check", "metrics", stdin=b"# TYPE foo counter\nfoo 1\n")
    assert code != 0 and 'should have "_total" suffix' in out, out


@pytest.mark.slow
def test_dynft_exposition_passes_promtool_check_metrics(promtool: str, live_dynft: Daemon) -> None:
    exposition = httpx.get(f"{live_dynft.base_url}/metrics", timeout=10).content  # over a real socket
    assert b"dynft_events_total" in exposition and b"dynft_kafka_lag" in exposition
    code, out = promtool_run(promtool, "check", "metrics", stdin=exposition)
    assert code == 0 and out == "", out


@pytest.mark.slow
def test_prometheus_scrapes_the_running_daemon(scraped: Prometheus, live_dynft: Daemon) -> None:
    assert scraped.value('up{job="dynft"}') == 1
    assert scraped.value('dynft_events_total{outcome="trained"}') > 100
    assert scraped.value('dynft_events_total{outcome="dead_lettered"}') >= 1
    assert scraped.value("dynft_train_steps_total") > 5
    assert 0 <= scraped.value("dynft_prequential_accuracy") <= 1
    assert 0 < scraped.value("dynft_prequential_majority_rate") <= 1
    assert scraped.value("dynft_labels") == 3
    assert scraped.value("dynft_serving_version") >= 1
    assert scraped.value('sum(dynft_adapter_versions_total{decision="promoted"})') >= 1
    assert scraped.value("sum(dynft_swaps_total)") >= 1
    assert scraped.value('dynft_requests_total{status="200"}') >= 1
    assert scraped.value('dynft_requests_total{status="422"}') >= 1
    assert scraped.value("dynft_predict_seconds_count") >= 1
    lags = scraped.query(f'dynft_kafka_lag{{topic="{live_dynft.topic}"}}')
    assert sorted(r["metric"]["partition"] for r in lags) == [str(p) for p in range(live_dynft.partitions)]
    assert all(float(r["value"][1]) >= 0 for r in lags)
    # Histograms work end to end: a latency quantile over the scraped buckets is a real number.
    p99 = scraped.value("histogram_quantile(0.99, sum by (le) (rate(dynft_predict_seconds_bucket[1m])))")
    assert 0 < p99 <= 10


@pytest.mark.slow
def test_alert_rules_load_and_evaluate_on_live_data(scraped: Prometheus) -> None:
    groups = scraped.api("rules", type="alert")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == ALERTS
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
        assert not rule["lastEvaluation"].startswith("0001-"), f"{rule['name']} was never evaluated"
    # A healthy, ready daemon: the alerts about being down or not ready are not even pending.
    assert scraped.query('ALERTS{alertname=~"DynftDown|DynftNotReady"}') == []
