"""The repository's examples as the tests use them: a LlamaDeployment of examples/, the Nodes of a
cluster of examples/clusters/ (read as `llama-operator sandbox` reads them)."""
from __future__ import annotations

from llama_operator.api import KIND
from llama_operator.sandbox.demo import load_docs

from kit.paths import CLUSTERS, EXAMPLES


def example(name: str) -> dict:
    """The LlamaDeployment of examples/<name> (e.g. "chat.yaml")."""
    docs = example_docs(name)
    assert len(docs) == 1
    return docs[0]


def example_docs(name: str) -> list[dict]:
    """Every LlamaDeployment of examples/<name> (e.g. "slo-loop.yaml")."""
    return [d for d in load_docs(EXAMPLES / name) if d.get("kind") == KIND]


def cluster_nodes(name: str) -> list[dict]:
    """The Nodes of examples/clusters/<name> (e.g. "mixed.yaml"), a List's items in its place."""
    return load_docs(CLUSTERS / name)
