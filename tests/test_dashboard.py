"""The Grafana dashboard and the PrometheusRule ask only for series the worker exports.

Every metric name in their PromQL must be a series the worker's ``Metrics`` registry (or the HTTP
server's ``worker_ready``) produces, with Prometheus' suffixes (``_total`` counters; ``_bucket``,
``_sum``, ``_count`` histograms; ``_info``), and every label they match or group by must be one the
series carry: the metric's own labels, ``process`` (the supervisor's merge), ``le``, and the target
labels Prometheus adds (``namespace``, ``pod``, ...). A renamed metric breaks this test, not a
dashboard nobody looks at until an incident.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from worker.health import READY_METRIC
from worker.metrics import Metrics

CHART_DIR = Path(__file__).resolve().parents[1] / "helm" / "gpu-worker"
DASHBOARD = CHART_DIR / "dashboards" / "gpu-worker.json"
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "service", "endpoint"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"),
            "info": ("_info",), "gauge": ("",), "unknown": ("",)}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset"}


def exported() -> tuple[set[str], set[str]]:
    """Series names and label names the worker exports (labels declared, even with no sample yet)."""
    metrics = Metrics()
    names, labels = {READY_METRIC}, {"process", "le"} | TARGET_LABELS
    for family in metrics.registry.collect():
        names.update(family.name + s for s in SUFFIXES[family.type])
        for sample in family.samples:
            labels.update(sample.labels)
    for attr in vars(metrics).values():
        labels.update(getattr(attr, "_labelnames", ()))
    return names, labels


def parse(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) used in a PromQL expression (Grafana variables removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", e):
        labels.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", e):
        labels.update(x.strip() for x in grouping.split(",") if x.strip())
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)
    names = {m.group(0) for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e)
             if not e[m.end():].lstrip().startswith("(") and m.group(0) not in PROMQL_KEYWORDS}
    return names, labels


def test_parse_finds_names_and_labels():
    # The parser itself, on a known expression (or a typo in every expression would pass).
    names, labels = parse('histogram_quantile(0.9, sum by (le) (rate(worker_x_bucket{namespace="$ns", '
                          'group=~"a.*"}[$__rate_interval]))) / on (pod) foo > 3 and deriv(bar[15m:1m]) > 0')
    assert names == {"worker_x_bucket", "foo", "bar"}
    assert labels == {"le", "namespace", "group", "pod"}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"].replace("label_values(", "").rsplit(",", 1)[0]
              for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def rule_exprs() -> list[str]:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install -e '.[dev]')")
    values = {"kafka": {"bootstrapServers": "kafka:9092"}, "prometheusRule": {"enabled": True}}
    with helm.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(values, name="vision", namespace="inference")
    docs = [d for name, text in manifests.items() if name.endswith("prometheusrule.yaml")
            for d in yaml.safe_load_all(text) if d]
    [rule] = docs
    return [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]


def test_dashboard_has_the_panels_the_issue_asks_for():
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert {"Throughput", "Batch size", "GPU busy", "Consumer lag per partition", "Dead letters by reason",
            "End-to-end latency"} <= titles


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_metric_and_label_exists(source):
    exprs = dashboard_exprs() if source == "dashboard" else rule_exprs()
    assert exprs
    names, labels = exported()
    used_names: set[str] = set()
    for expr in exprs:
        n, l_ = parse(expr)
        assert n, f"no metric in {expr!r}"
        assert n <= names, f"{sorted(n - names)} not exported by the worker (in {expr!r})"
        assert l_ <= labels, f"labels {sorted(l_ - labels)} not on any worker series (in {expr!r})"
        used_names |= n
    if source == "rules":
        assert {"worker_consumer_lag_messages", "worker_messages_dead_lettered_total",
                "worker_messages_failed_total", READY_METRIC} <= used_names


def test_rules_and_dashboard_render_in_the_chart():
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install -e '.[dev]')")
    with helm.Chart.load(CHART_DIR) as chart:
        off = chart.render({"kafka": {"bootstrapServers": "kafka:9092"}}, name="vision", namespace="inference")
        on = chart.render({"kafka": {"bootstrapServers": "kafka:9092"}, "grafanaDashboard": {"enabled": True},
                           "prometheusRule": {"enabled": True, "labels": {"release": "kps"}}},
                          name="vision", namespace="inference")
    assert not any(k.endswith(("prometheusrule.yaml", "configmap-dashboard.yaml")) and v.strip()
                   for k, v in off.items()), "both are off by default"
    objs = [d for k, text in on.items() if not k.endswith(".txt") for d in yaml.safe_load_all(text) if d]
    [cm] = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["gpu-worker.json"]) == json.loads(DASHBOARD.read_text())
    [rule] = [o for o in objs if o["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "kps"
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {"GpuWorkerLagGrowing", "GpuWorkerPartitionsUneven", "GpuWorkerDeadLetters",
                      "GpuWorkerDeviceErrors", "GpuWorkerNotReady"}
