"""Where the files the tests read are: the repository's root, found from this file, and paths below it."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CLUSTERS = EXAMPLES / "clusters"
CRD_FILE = ROOT / "crds" / "llamadeployments.yaml"
PEERING_CRDS = ROOT / "charts" / "llama-operator" / "crds" / "kopf-peerings.yaml"
