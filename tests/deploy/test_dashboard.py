"""deploy/grafana: the dashboard's PromQL names only metrics dynft exports, and real Prometheus runs all of it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest
import yaml

from deploy.conftest import DEPLOY, SYNTHETIC, Daemon, Prometheus, exported_names

DASHBOARD = DEPLOY / "grafana" / "dynft.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
# What Grafana puts in place of its variables before the query reaches Prometheus.
EQUAL = promql_parser.MatchOp.Equal
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "5m", "$instance": ".*", "$task": ".*"}
# The issue's list of what the dashboard shows, as the series that show it.
REQUIRED = {
    "dynft_events_total",
    "dynft_kafka_lag",
    "dynft_buffer_events",
    "dynft_train_steps_total",
    "dynft_train_loss",
    "dynft_prequential_accuracy",
    "dynft_adapter_versions_total",
    "dynft_serving_version",
    "dynft_swap_seconds_bucket",
    "dynft_predict_seconds_bucket",
    "dynft_requests_total",
}
# Panels whose query may rightly be empty on a short healthy run: they filter with `> 0` for
# something that did not happen within the last minute.
MAY_BE_EMPTY = {"Dead-lettered events/s by reason"}


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from all_panels(panel.get("panels", []))


def panels_with_queries() -> list[dict[str, Any]]:
    return [p for p in all_panels(load_dashboard()["panels"]) if p["type"] != "row"]


def dashboard_expressions() -> dict[str, str]:
    """Every PromQL expression of the dashboard (panels and annotations), by where it is."""
    dashboard = load_dashboard()
    found = {f"panel {p['title']!r} {t['refId']}": t["expr"] for p in panels_with_queries() for t in p["targets"]}
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            found[f"annotation {annotation['name']!r}"] = annotation["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(SELECTOR, LABEL) is Grafana's; SELECTOR is PromQL
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"])
            assert match, variable
            found[f"variable {variable['name']!r}"] = match.group(1)
    return found


def alert_expressions() -> dict[str, str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return {f"alert {r['alert']}": r["expr"] for group in rules["groups"] for r in group["rules"]}


def as_promql(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, from the real PromQL grammar (promql-parser)."""
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            fixed = [m.value for m in node.matchers.matchers if m.name == "__name__" and m.op == EQUAL]
            name = node.name or (fixed[0] if fixed else None)
            assert name, f"a selector without a fixed metric name in {expr}"
            names.add(name)
        return True

    promql_parser.walk(promql_parser.parse(as_promql(expr)), visit)
    return names


def test_metric_names_come_from_the_promql_grammar() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{instance=~"$instance"}[$__rate_interval]))) > b unless c'
    )
    assert metric_names(expr) == {"a_bucket", "b", "c"}
    assert metric_names('sum by (reason) (x_total{reason="le"}) and on (instance) {__name__="y"}') == {"x_total", "y"}
    with pytest.raises(ValueError):
        metric_names("sum(rate(x[1m])")


def test_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "dynft" and dashboard["title"] == "dynft"
    panels = list(all_panels(dashboard["panels"]))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine
    queried = panels_with_queries()
    assert len(queried) >= 12
    for panel in queried:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
    drift = [a for a in dashboard["annotations"]["list"] if a.get("name") == "Drift detections"]
    assert len(drift) == 1 and metric_names(drift[0]["expr"]) == {"dynft_drift_detections_total"}
    accuracy = next(p for p in queried if p["title"] == "Prequential accuracy")
    assert "dynft_prequential_accuracy" in metric_names(accuracy["targets"][0]["expr"])


def test_dashboard_shows_everything_the_issue_lists() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_expressions().values()))
    assert used >= REQUIRED, REQUIRED - used


@pytest.mark.slow
def test_every_expression_names_only_metrics_dynft_exports(live_dynft: Daemon) -> None:
    """Dashboard, annotations, variables and alert rules, against the names of the live exposition."""
    exported = exported_names(live_dynft.metrics())
    assert {"dynft_events_total", "dynft_predict_seconds_bucket", "dynft_kafka_lag"} <= exported
    expressions = {**dashboard_expressions(), **alert_expressions()}
    assert len(expressions) >= 40
    unknown = {where: sorted(metric_names(expr) - exported - SYNTHETIC) for where, expr in expressions.items()}
    assert {where: names for where, names in unknown.items() if names} == {}
    # The comparison does catch a wrong name (README-style names without the exposition suffix).
    assert metric_names("rate(dynft_events[5m])") - exported == {"dynft_events"}


@pytest.mark.slow
def test_prometheus_runs_every_expression_on_the_scraped_data(scraped: Prometheus) -> None:
    expressions = {**dashboard_expressions(), **alert_expressions()}
    results = {where: scraped.query(as_promql(expr)) for where, expr in expressions.items()}  # each: success
    for panel in panels_with_queries():
        if panel["title"] in MAY_BE_EMPTY:
            continue
        first = f"panel {panel['title']!r} {panel['targets'][0]['refId']}"
        assert results[first], f"{first} shows nothing on a running daemon: {expressions[first]}"
    instances = results["variable 'instance'"]
    assert [r["metric"]["instance"] for r in instances if r["metric"].get("outcome") == "trained"] != []


def test_grafana_provisioning_matches_the_compose_stack() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in grafana["volumes"] if volume.startswith("./"))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard_path = mounts["./grafana/dynft.json"]
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert len(sources) == 1 and sources[0]["type"] == "prometheus"
    assert sources[0]["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    variable = next(v for v in load_dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert variable["query"] == "prometheus" and variable["current"]["value"] == sources[0]["uid"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    assert (
        sources[0]["jsonData"]["timeInterval"] == next(j for j in scrape if j["job_name"] == "dynft")["scrape_interval"]
    )
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "dynft.yaml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == [dashboard_path.rsplit("/", 1)[0]]
