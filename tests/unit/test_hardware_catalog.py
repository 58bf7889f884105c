"""Checks on the hardware catalog (operator/llama_operator/catalog/hardware.yaml) and on the
example clusters (examples/clusters/*.yaml) that are keyed against it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kit.paths import ROOT

CATALOG = ROOT / "operator" / "llama_operator" / "catalog" / "hardware.yaml"
CLUSTERS = sorted((ROOT / "examples" / "clusters").glob("*.yaml"))

REQUIRED = {
    "product": str,
    "aliases": list,
    "name": str,
    "vendor": str,
    "memoryGiB": (int, float),
    "memoryBandwidthGBps": (int, float),
    "bf16TFLOPS": (int, float, type(None)),
    "fp16TFLOPS": (int, float, type(None)),
    "fp8TFLOPS": (int, float, type(None)),
    "int8TOPS": (int, float, type(None)),
    "computeCapability": (str, type(None)),
    "interconnect": str,
    "source": str,
}
OPTIONAL = {"labelKey": str, "arch": str, "fp16AccTFLOPS": (int, float)}

# Every GPU the project brief names, as GFD / AMD-labeller product values.
MUST_HAVE = [
    "NVIDIA-H200",
    "NVIDIA-H100-80GB-HBM3",
    "NVIDIA-H100-PCIe",
    "NVIDIA-H100-NVL",
    "NVIDIA-A100-SXM4-40GB",
    "NVIDIA-A100-SXM4-80GB",
    "NVIDIA-A100-PCIE-40GB",
    "NVIDIA-A100-80GB-PCIe",
    "NVIDIA-A40",
    "NVIDIA-A10",
    "NVIDIA-A10G",
    "NVIDIA-L40S",
    "NVIDIA-L40",
    "NVIDIA-L4",
    "Tesla-T4",
    "Tesla-V100-SXM2-16GB",
    "Tesla-V100-SXM2-32GB",
    "Tesla-V100-PCIE-16GB",
    "Tesla-V100-PCIE-32GB",
    "NVIDIA-RTX-A6000",
    "NVIDIA-RTX-6000-Ada-Generation",
    "NVIDIA-GeForce-RTX-4090",
    "NVIDIA-GeForce-RTX-3090",
    "AMD_Instinct_MI300X_OAM",
    "NVIDIA-B200",
    "NVIDIA-H20",
    "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition",
    "NVIDIA-RTX-PRO-6000-Blackwell-Workstation-Edition",
    "AMD_Instinct_MI325_OAM",
]
# Short names users write in placement.gpuProducts.
FRIENDLY = ["H100-SXM", "H100", "L4", "T4", "A100-80GB", "A10G", "L40S", "MI300X", "H200", "B200", "H20",
            "RTX-PRO-6000", "MI325X"]

GFD_LABELS = [
    "nvidia.com/gpu.product",
    "nvidia.com/gpu.memory",
    "nvidia.com/gpu.count",
    "nvidia.com/gpu.family",
    "nvidia.com/cuda.driver.major",
    "nvidia.com/gpu.compute.major",
    "nvidia.com/gpu.compute.minor",
]
STD_LABELS = [
    "kubernetes.io/hostname",
    "kubernetes.io/arch",
    "kubernetes.io/os",
    "node.kubernetes.io/instance-type",
    "topology.kubernetes.io/zone",
]
QTY = re.compile(r"^\d+(\.\d+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


@pytest.fixture(scope="module")
def catalog() -> dict:
    with CATALOG.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def gpus(catalog) -> list[dict]:
    return catalog["gpus"]


def _names(entry: dict) -> list[str]:
    return [entry["product"], *entry["aliases"]]


@pytest.fixture(scope="module")
def index(gpus) -> dict[str, dict]:
    return {name: g for g in gpus for name in _names(g)}


def _unsourced(entry: dict) -> bool:
    return "UNSOURCED" in entry["source"]


def test_top_level_shape(catalog):
    assert set(catalog) == {"gpus", "cpu", "network"}


def test_network_defaults_are_labelled_and_sane(catalog):
    net = catalog["network"]
    assert set(net) == {"bandwidthLabelKey", "defaultBandwidthGbps", "hopLatencySeconds", "source"}
    assert net["bandwidthLabelKey"].startswith("llama-operator.dev/")
    assert 1 <= net["defaultBandwidthGbps"] <= 3200
    assert 0 < float(net["hopLatencySeconds"]) < 1e-3
    assert "assumed" in net["source"].lower()  # no measurement behind it: it says so
    assert isinstance(catalog["gpus"], list) and len(catalog["gpus"]) >= len(MUST_HAVE)


def test_every_entry_has_all_fields_with_sane_types(gpus):
    for g in gpus:
        where = g.get("product", g)
        missing = set(REQUIRED) - set(g)
        assert not missing, f"{where}: missing {missing}"
        extra = set(g) - set(REQUIRED) - set(OPTIONAL)
        assert not extra, f"{where}: unknown fields {extra}"
        for key, typ in {**REQUIRED, **OPTIONAL}.items():
            if key in g:
                assert isinstance(g[key], typ) and not isinstance(g[key], bool), (where, key, g[key])
        assert all(isinstance(a, str) and a for a in g["aliases"]), where
        assert g["vendor"] in {"nvidia", "amd"}, where
        assert g["interconnect"] in {"nvlink", "pcie", "infinity-fabric"}, where
        assert len(g["source"]) > 40, f"{where}: source too thin"


def test_ranges(gpus):
    for g in gpus:
        where = g["product"]
        assert 8 <= g["memoryGiB"] <= 300, where
        assert 100 <= g["memoryBandwidthGBps"] <= 10_000, where
        for key in ("bf16TFLOPS", "fp16TFLOPS", "fp8TFLOPS", "int8TOPS"):
            v = g[key]
            if v is not None:
                assert 10 <= v <= 5_000, (where, key, v)
        # Dense figures: FP16 and BF16 tensor rates are equal where both are known, and FP8 /
        # INT8 run at 2x the 16-bit rate (4x on GeForce parts, whose FP32-accumulate 16-bit
        # rate is halved).
        if g["bf16TFLOPS"] is not None and g["fp16TFLOPS"] is not None:
            assert abs(g["bf16TFLOPS"] - g["fp16TFLOPS"]) <= 0.01 * g["fp16TFLOPS"] + 10, where
        for key in ("fp8TFLOPS", "int8TOPS"):
            if g[key] is not None and g["fp16TFLOPS"] is not None:
                assert 1.9 <= g[key] / g["fp16TFLOPS"] <= 4.1, (where, key)


def test_nulls_are_either_unsupported_or_marked_unsourced(gpus):
    no_bf16 = {"Tesla-T4", "Tesla-V100-SXM2-16GB", "Tesla-V100-SXM2-32GB",
               "Tesla-V100-PCIE-16GB", "Tesla-V100-PCIE-32GB"}
    for g in gpus:
        where = g["product"]
        if g["fp16TFLOPS"] is None:
            assert _unsourced(g), f"{where}: fp16 null without UNSOURCED note"
        if g["bf16TFLOPS"] is None and where not in no_bf16:
            assert _unsourced(g), f"{where}: bf16 null but the GPU has BF16 tensor cores"
        if g["int8TOPS"] is None and where not in no_bf16:  # Volta has no INT8 tensor op
            assert _unsourced(g), f"{where}: int8 null without UNSOURCED note"
        cc = g["computeCapability"]
        if cc is not None and g["fp8TFLOPS"] is not None:
            assert tuple(map(int, cc.split("."))) >= (8, 9), f"{where}: FP8 needs Ada/Hopper"


def test_compute_capability_and_vendor_specifics(gpus):
    for g in gpus:
        where = g["product"]
        if g["vendor"] == "nvidia":
            assert re.fullmatch(r"\d+\.\d+", g["computeCapability"] or ""), where
            assert "labelKey" not in g and "arch" not in g, where
        else:
            assert g["computeCapability"] is None, where
            assert re.fullmatch(r"gfx\d+", g.get("arch", "")), where
            assert g.get("labelKey") == "amd.com/gpu.product-name", where


def test_products_and_aliases_unique(gpus):
    seen: dict[str, str] = {}
    for g in gpus:
        for name in _names(g):
            assert name not in seen, f"{name!r} in both {seen[name]} and {g['product']}"
            seen[name] = g["product"]


def test_required_gpus_present(index, gpus):
    products = {g["product"] for g in gpus}
    missing = [p for p in MUST_HAVE if p not in products]
    assert not missing, missing
    assert [f for f in FRIENDLY if f not in index] == []


def test_gfd_product_spelling(gpus):
    # GFD replaces spaces with dashes; a canonical NVIDIA product never contains spaces.
    for g in gpus:
        assert " " not in g["product"], g["product"]


def test_memory_comments_match_the_figures():
    # "memoryGiB: 79.65   # 81559 MiB": the MiB a source showed, and the GiB figure derived from it
    pairs = re.findall(r"memoryGiB: ([\d.]+)\s+# (\d+) MiB", CATALOG.read_text())
    assert len(pairs) >= len(MUST_HAVE) - 2  # the AMD entries state bytes / GB instead
    for gib, mib in pairs:
        assert abs(int(mib) / 1024 - float(gib)) < 0.006, (gib, mib)


@pytest.mark.parametrize("product, mib", [
    ("Tesla-V100-SXM2-16GB", 16160), ("Tesla-V100-PCIE-16GB", 16160),
    ("Tesla-V100-SXM2-32GB", 32510), ("Tesla-V100-PCIE-32GB", 32510),
])
def test_v100_memory_is_the_usable_driver_total(index, product, mib):
    # nvidia-smi / GFD on pre-R530 drivers: 16160 MiB (16 GB) and 32510 MiB (32 GB), not 16384 / 32768
    g = index[product]
    assert g["memoryGiB"] == round(mib / 1024, 2)
    assert g["memoryGiB"] < (16 if "16GB" in product else 32)
    assert f"{mib}MiB" in g["source"] or f"{mib} MiB" in g["source"]
    assert g["computeCapability"] == "7.0" and g["memoryBandwidthGBps"] == 900


# product: (memoryGiB, bandwidth GB/s, bf16, fp16, fp8, int8, compute capability, interconnect)
NEW_ENTRIES = {
    "NVIDIA-B200": (179.06, 8000, 2250, 2250, 4500, 4500, "10.0", "nvlink"),
    "NVIDIA-H20": (95.58, 4000, 148, 148, 296, 296, "9.0", "nvlink"),
    "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition": (95.59, 1792, None, None, None, None, "12.0", "pcie"),
    "NVIDIA-RTX-PRO-6000-Blackwell-Workstation-Edition": (95.59, 1792, None, None, None, None, "12.0", "pcie"),
    "AMD_Instinct_MI325_OAM": (238.42, 6000, 1307.4, 1307.4, 2610, 2600, None, "infinity-fabric"),
    # present before, checked again: H200 and L40
    "NVIDIA-H200": (140.4, 4800, 989, 989, 1979, 1979, "9.0", "nvlink"),
    "NVIDIA-L40": (44.99, 864, 181.05, 181.05, 362, 362, "8.9", "pcie"),
}


@pytest.mark.parametrize("product", sorted(NEW_ENTRIES))
def test_new_entry_figures(index, product):
    g = index[product]
    keys = ("memoryGiB", "memoryBandwidthGBps", "bf16TFLOPS", "fp16TFLOPS", "fp8TFLOPS", "int8TOPS",
            "computeCapability", "interconnect")
    assert tuple(g[k] for k in keys) == NEW_ENTRIES[product]
    if g["bf16TFLOPS"] is None:  # Blackwell has BF16 tensor cores: a null here must say it is unsourced
        assert "UNSOURCED" in g["source"]


def test_new_entries_are_found_by_gfd_names_and_aliases():
    from llama_operator.catalog import load_catalog

    find = load_catalog().find_gpu
    expect = {
        "NVIDIA-B200": ["NVIDIA-B200", "B200", "nvidia-b200"],
        "NVIDIA-H20": ["NVIDIA-H20", "H20"],
        "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition": [
            "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition", "RTX-PRO-6000", "RTX-PRO-6000-Server"],
        "NVIDIA-RTX-PRO-6000-Blackwell-Workstation-Edition": [
            "NVIDIA-RTX-PRO-6000-Blackwell-Workstation-Edition", "RTX-PRO-6000-Workstation"],
        "AMD_Instinct_MI325_OAM": ["AMD_Instinct_MI325_OAM", "MI325X", "AMD-MI325X", "AMD_Instinct_MI325X"],
        "NVIDIA-H200": ["NVIDIA-H200", "H200"],
        "NVIDIA-L40": ["NVIDIA-L40", "L40"],
    }
    for product, names in expect.items():
        for name in names:
            gpu = find(name)
            assert gpu is not None and gpu.product == product, name
    mi325 = find("MI325X")
    assert mi325.vendor == "amd" and mi325.label_key == "amd.com/gpu.product-name" and mi325.arch == "gfx942"
    # H20 is not the 141 GB H20-3e, and the L40 is not the L40S
    assert find("NVIDIA-H20-3e") is None
    assert find("L40").product != find("L40S").product
    # GFD writes label values of at most 63 characters
    assert all(len(p) <= 63 for p in expect)


def test_cpu_section(catalog):
    cpu = catalog["cpu"]
    assert cpu["memoryBandwidthLabelKey"] == "llama-operator.dev/memory-bandwidth-gbps"
    assert 10 <= cpu["defaultMemoryBandwidthGBps"] <= 500
    assert "defaultEffectiveTFLOPS" not in cpu  # a fitted estimator constant now: cpunode.py
    assert isinstance(cpu["source"], str) and len(cpu["source"]) > 40


# ------------------------------------------------------------------ example clusters


def _load_cluster(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def test_example_cluster_files_exist():
    names = {p.name for p in CLUSTERS}
    assert {"cpu-only.yaml", "l4-pool.yaml", "a100.yaml", "h100-8x.yaml", "mixed.yaml"} <= names
    for p in CLUSTERS:
        assert p.read_text().startswith("#"), f"{p.name} must start with a comment"


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_example_nodes_are_valid(path, index):
    doc = _load_cluster(path)
    assert doc["apiVersion"] == "v1" and doc["kind"] == "List"
    # Besides Nodes a cluster file may hold LeaderWorkerSet's CRD (it marks LeaderWorkerSet installed).
    others = [d for d in doc["items"] if d.get("kind") != "Node"]
    assert all(d["kind"] == "CustomResourceDefinition" and d["apiVersion"] == "apiextensions.k8s.io/v1"
               and d["metadata"]["name"] == "leaderworkersets.leaderworkerset.x-k8s.io" for d in others), others
    items = [d for d in doc["items"] if d.get("kind") == "Node"]
    assert items
    names = [n["metadata"]["name"] for n in items]
    assert len(set(names)) == len(names)
    for n in items:
        name = n["metadata"]["name"]
        assert n["apiVersion"] == "v1" and n["kind"] == "Node", name
        labels = n["metadata"]["labels"]
        assert all(isinstance(v, str) for v in labels.values()), f"{name}: label values must be strings"
        for key in STD_LABELS:
            assert key in labels, (name, key)
        assert labels["kubernetes.io/hostname"] == name
        status = n["status"]
        for section in ("capacity", "allocatable"):
            res = status[section]
            for key in ("cpu", "memory", "pods", "ephemeral-storage"):
                assert key in res and QTY.match(str(res[key])), (name, section, key)
        ready = [c for c in status["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", name
        info = status["nodeInfo"]
        for key in ("kubeletVersion", "containerRuntimeVersion", "osImage", "architecture",
                    "operatingSystem", "kernelVersion"):
            assert info.get(key), (name, key)

        product = labels.get("nvidia.com/gpu.product")
        taints = n.get("spec", {}).get("taints", [])
        if product is None:
            assert "nvidia.com/gpu" not in status["capacity"], name
            continue
        for key in GFD_LABELS:
            assert key in labels, (name, key)
        assert product in index, f"{path.name}:{name}: {product} not in hardware catalog"
        entry = index[product]
        count = labels["nvidia.com/gpu.count"]
        assert status["allocatable"]["nvidia.com/gpu"] == count, name
        assert status["capacity"]["nvidia.com/gpu"] == count, name
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in taints, name
        # gpu.memory (MiB) must agree with the catalog's memoryGiB.
        assert abs(int(labels["nvidia.com/gpu.memory"]) / 1024 - entry["memoryGiB"]) < 0.01, name
        cc = f'{labels["nvidia.com/gpu.compute.major"]}.{labels["nvidia.com/gpu.compute.minor"]}'
        assert cc == entry["computeCapability"], name


def test_cpu_only_cluster_has_bandwidth_override(catalog):
    doc = _load_cluster(ROOT / "examples" / "clusters" / "cpu-only.yaml")
    key = catalog["cpu"]["memoryBandwidthLabelKey"]
    overridden = [n for n in doc["items"] if key in n["metadata"]["labels"]]
    assert len(doc["items"]) == 3 and len(overridden) == 1
    assert float(overridden[0]["metadata"]["labels"][key]) > 0
