"""The chart lints strictly and renders manifests that the Kubernetes 1.29 and 1.34 schemas accept.

kubernetes-validate checks built-in kinds (and the CRDs themselves, as apiextensions.k8s.io
objects) offline, with --strict so unknown fields fail. It skips custom resources with a warning;
the tests make sure only the expected custom kinds are skipped, so a typo in a built-in kind's
apiVersion cannot slip through as "unknown, skipped".
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chartkit import CHART, FULLNAME, NAMESPACE, SCENARIOS, by_kind

KUBE_VERSIONS = ["1.29.0", "1.34.0"]
# Custom resources the chart renders, which kubernetes-validate has no schema for.
CUSTOM_KINDS = {"ClusterKopfPeering", "KopfPeering", "PodMonitor", "ServiceMonitor", "PrometheusRule"}
STANDARD_LABELS = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
]


def kubernetes_validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kubernetes_validate"]
    return subprocess.run(
        [*cmd, "--strict", "-k", version, str(path)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("values", ["default", "all-on"])
def test_helm_lint_strict(helm, values):
    args = ["lint", "--strict", str(CHART)]
    if values == "all-on":
        args += ["-f", str(CHART / "ci" / "all-on-values.yaml")]
    proc = helm(*args)
    assert "0 chart(s) failed" in proc.stdout


def test_helm_lint_strict_namespaced(helm):
    helm("lint", "--strict", str(CHART), *SCENARIOS["namespaced"])


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_rendered_manifests_validate_strictly(render, tmp_path, name, version):
    text, docs = render(*SCENARIOS[name], "--kube-version", version)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    proc = kubernetes_validate(path, version)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"kubernetes-validate {version} rejected {name}:\n{output}"

    passed = re.findall(r"passed for resource (\S+)", output)
    skipped = set(re.findall(r"Couldn't find schema for kind (\S+)", output))
    builtin = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    assert len(passed) == len(builtin), f"not every built-in object was validated:\n{output}"
    assert skipped <= CUSTOM_KINDS, f"unexpected kinds without a schema: {skipped - CUSTOM_KINDS}"
    # The CRDs (chart crds/ directory) are validated as apiextensions.k8s.io/v1 objects.
    crds = by_kind(docs, "CustomResourceDefinition")
    assert {c["metadata"]["name"] for c in crds} >= {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    assert sum(p.startswith("customresourcedefinition/") for p in passed) == len(crds)


def test_validator_catches_a_bad_field(tmp_path):
    """The validation above is not vacuous: an unknown field in a Deployment fails --strict."""
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i", "runAsUser": 1}]},
            },
        },
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert kubernetes_validate(path, "1.29.0").returncode != 0


def test_kube_version_floor(helm):
    """Chart.yaml's kubeVersion (>=1.29) refuses older clusters."""
    proc = helm("template", "x", str(CHART), "--kube-version", "1.28.0", check=False)
    assert proc.returncode != 0
    assert "kubeVersion" in proc.stderr or "incompatible" in proc.stderr


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_templated_object_has_standard_labels(scenario, name):
    for doc in scenario(name):
        if doc["kind"] == "CustomResourceDefinition":
            continue  # crds/ files are not templated
        labels = doc["metadata"].get("labels", {})
        missing = [k for k in STANDARD_LABELS if k not in labels]
        assert not missing, f"{doc['kind']}/{doc['metadata']['name']} lacks labels {missing}"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "llama-operator"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_namespaced_objects_carry_a_namespace(scenario, name):
    cluster_scoped = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    for doc in scenario(name):
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace"), f"{doc['kind']}/{doc['metadata']['name']} has no namespace"
        else:
            assert "namespace" not in doc["metadata"]


def test_default_image_and_args(scenario):
    docs = scenario("default")
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["kubeVersion"].startswith(">=1.29")
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"ghcr.io/llama-operator/llama-operator:{chart['appVersion']}"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["args"] == [
        "run", "--all-namespaces", "--metrics-address=0.0.0.0", "--metrics-port=8080",
        "--health-address=0.0.0.0", "--health-port=8081", "--log-format=plain",
        "--forbid-toleration=node-role.kubernetes.io/control-plane",
        "--forbid-toleration=node-role.kubernetes.io/master", "--slo-source=pods", "--slo-interval=30s",
        "--slo-window=5m", "--slo-cooldown=5m", "--slo-calm-window=15m", "--slo-min-samples=20",
        "--correction-ttl=24h", "--standalone",
    ]
    assert deploy["metadata"] == {**deploy["metadata"], "name": FULLNAME, "namespace": NAMESPACE}


def test_notes_tell_the_next_step(helm):
    proc = helm("install", "llm", str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply" in notes
    assert "kubectl get llamad" in notes
    assert f"helm test llm -n {NAMESPACE}" in notes
    assert "LeaderWorkerSet" in notes  # the optional prerequisite of replicas across nodes


def _run_args(render, *values: str) -> list[str]:
    _, docs = render(*values)
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    return deploy["spec"]["template"]["spec"]["containers"][0]["args"]


def test_run_flags_from_values(render):
    """The chart passes what `llama-operator run` takes: listen addresses, forbidden tolerations, and in a
    namespaced install the cluster-wide Pod reads its ClusterRole grants."""
    args = _run_args(render, "--set", "operator.metricsAddress=::", "--set", "operator.healthAddress=::",
                     "--set", "operator.forbiddenTolerations={dedicated}")
    assert "--metrics-address=::" in args and "--health-address=::" in args
    assert [a for a in args if a.startswith("--forbid-toleration")] == ["--forbid-toleration=dedicated"]
    args = _run_args(render, "--set-json", "operator.forbiddenTolerations=[]")
    assert [a for a in args if a.startswith("--forbid-toleration")] == ["--forbid-toleration="]  # none forbidden
    assert "--pods-all-namespaces" not in _run_args(render)  # cluster-wide: every Pod anyway
    namespaced = ["--set", "watch.namespaced=true", "--set", "watch.namespaces={team-a}"]
    assert "--pods-all-namespaces" in _run_args(render, *namespaced)
    assert "--pods-all-namespaces" not in _run_args(render, *namespaced, "--set", "watch.podsAllNamespaces=false")


def test_the_chart_args_parse_as_llama_operator_run(scenario):
    """Every scenario's arguments are ones `llama-operator run` accepts (its own parser)."""
    from llama_operator.cli import _bind_address, _forbidden_tolerations, build_parser

    for name in SCENARIOS:
        deploy = next(d for d in scenario(name) if d["kind"] == "Deployment")
        args = build_parser().parse_args(deploy["spec"]["template"]["spec"]["containers"][0]["args"])
        assert args.command == "run"
        _bind_address("--metrics-address", args.metrics_address)
        _bind_address("--health-address", args.health_address)
        _forbidden_tolerations(args.forbid_toleration)
