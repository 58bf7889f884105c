"""values.schema.json rejects bad values with a message naming the field, at install and lint time;
and every key of values.yaml is declared in the schema (so additionalProperties: false cannot reject
a documented default)."""
from __future__ import annotations

import json

import pytest
import yaml

from chartkit import CHART

# (values file content, text the error must contain: the field's path or name)
BAD_VALUES = {
    "replicas-zero": ("replicaCount: 0\n", "/replicaCount"),
    "replicas-string": ("replicaCount: two\n", "/replicaCount"),
    "unknown-top-level-key": ("replicas: 2\n", "'replicas'"),
    "unknown-nested-key": ("image:\n  pullpolicy: Always\n", "'pullpolicy'"),
    "pull-policy-enum": ("image:\n  pullPolicy: Sometimes\n", "/image/pullPolicy"),
    "log-format-enum": ("operator:\n  logFormat: xml\n", "/operator/logFormat"),
    "privileged-port": ("operator:\n  metricsPort: 80\n", "/operator/metricsPort"),
    "namespaced-without-namespaces": ("watch:\n  namespaced: true\n", "/watch/namespaces"),
    "namespace-not-dns-label": ("watch:\n  namespaced: true\n  namespaces: [Team_A]\n", "/watch/namespaces/0"),
    "root-allowed": ("securityContext:\n  runAsNonRoot: false\n", "/securityContext/runAsNonRoot"),
    "scrape-interval-format": ("metrics:\n  serviceMonitor:\n    interval: 30 seconds\n", "/metrics/serviceMonitor/interval"),
    "unknown-runtime": ("metrics:\n  podMonitors:\n    runtimes: [ollama]\n", "/metrics/podMonitors/runtimes/0"),
    "service-type-enum": ("service:\n  type: ExternalName\n", "/service/type"),
    "digest-format": ("image:\n  digest: latest\n", "/image/digest"),
    "metrics-address-hostname": ("operator:\n  metricsAddress: localhost\n", "/operator/metricsAddress"),
    "health-address-with-port": ("operator:\n  healthAddress: 0.0.0.0:8081\n", "/operator/healthAddress"),
    "forbidden-toleration-not-a-key": ("operator:\n  forbiddenTolerations: [a b]\n",
                                       "/operator/forbiddenTolerations/0"),
    "pods-all-namespaces-string": ("watch:\n  podsAllNamespaces: yes please\n", "/watch/podsAllNamespaces"),
    "runbook-base-not-a-url": ("metrics:\n  prometheusRule:\n    runbookBaseUrl: wiki page\n",
                               "/metrics/prometheusRule/runbookBaseUrl"),
    "runbook-base-with-anchor": ("metrics:\n  prometheusRule:\n    runbookBaseUrl: https://x.example/a#b\n",
                                 "/metrics/prometheusRule/runbookBaseUrl"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
@pytest.mark.parametrize("command", ["template", "lint"])
def test_schema_rejects_bad_values(helm, tmp_path, case, command):
    content, field = BAD_VALUES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(content)
    if command == "template":
        proc = helm("template", "llm", str(CHART), "-f", str(path), check=False)
    else:
        proc = helm("lint", "--strict", str(CHART), "-f", str(path), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"{case} was accepted:\n{output}"
    assert "schema" in output or "values.yaml" in output, output
    assert field in output, f"the error does not name {field}:\n{output}"


def test_template_checks_beyond_the_schema(helm):
    """Rules JSON Schema cannot state are enforced by the templates, with a message naming the fields."""
    proc = helm("template", "llm", str(CHART), "--set", "operator.healthPort=8080", check=False)
    assert proc.returncode != 0
    assert "operator.metricsPort and operator.healthPort must differ" in proc.stderr
    proc = helm("template", "llm", str(CHART), "--set", "slo.source=prometheus", check=False)
    assert proc.returncode != 0
    assert "slo.source prometheus needs slo.prometheusUrl" in proc.stderr


def test_the_slo_loop_values_become_run_options_the_cli_accepts(render):
    """slo.* renders to `run --slo-*` arguments, and the operator's own parser takes them as they are."""
    from llama_operator.cli import build_parser
    from llama_operator.slo_options import slo_run_options

    _, docs = render("--set", "slo.source=prometheus", "--set", "slo.prometheusUrl=http://prom.monitoring:9090",
                     "--set", "slo.window=10m")
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--prometheus-url=http://prom.monitoring:9090" in args and "--slo-window=10m" in args
    settings, interval, source = slo_run_options(build_parser().parse_args(args))
    assert source["slo_source"] == "prometheus" and source["prometheus_url"] == "http://prom.monitoring:9090"
    assert settings.window.total_seconds() == 600 and interval == 30
    assert settings.correction_ttl.total_seconds() == 24 * 3600 and settings.min_samples == 20


def _leaf_paths(value, prefix=()):
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            yield from _leaf_paths(sub, (*prefix, key))
    else:
        yield prefix


def _schema_declares(schema: dict, path: tuple) -> bool:
    node = schema
    for key in path:
        props = node.get("properties", {})
        if key in props:
            node = props[key]
        elif node.get("additionalProperties") is False:
            return False
        else:
            return True  # a free-form object (labels, affinity...): anything goes below
    return True


def test_every_default_is_declared_in_the_schema():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    undeclared = ["/".join(p) for p in _leaf_paths(values) if not _schema_declares(schema, p)]
    assert not undeclared


def test_values_yaml_is_documented_line_by_line():
    """Every key of values.yaml has a comment right above it, or sits in a block whose key has one."""
    lines = (CHART / "values.yaml").read_text().splitlines()

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    def is_key(line: str) -> bool:
        s = line.strip()
        return bool(s) and not s.startswith(("#", "- ")) and ":" in s

    def documented(i: int) -> bool:
        if i > 0 and lines[i - 1].strip().startswith("#"):
            return True
        for j in range(i - 1, -1, -1):  # the parent key documents its block
            if is_key(lines[j]) and indent(lines[j]) < indent(lines[i]):
                return documented(j)
        return False

    undocumented = [f"{i + 1}: {l.strip()}" for i, l in enumerate(lines) if is_key(l) and not documented(i)]
    assert not undocumented, "keys without a comment:\n" + "\n".join(undocumented)
