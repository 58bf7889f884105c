"""The inventory: what nodes offer, what bound pods take, and Inventory.reserve."""
from __future__ import annotations

import pytest

from dataclasses import replace

from llama_operator.catalog import load_catalog
from llama_operator.inventory import _node_gpu, _unknown_gpu, node_from_manifest, pod_usage

from kit.examples import cluster_nodes
from kit.paths import CLUSTERS


# --- Nodes ---------------------------------------------------------------------------------------------


def test_gpu_node_from_gfd_labels(make_node):
    node = node_from_manifest(make_node("g1", "NVIDIA-L4", 1, cpu="7910m", memory="31205621Ki"))
    assert node.ready
    shape = node.shape
    assert shape.gpu is load_catalog().find_gpu("NVIDIA-L4")
    assert shape.gpus_per_node == 1
    assert shape.cpu_millis == 7910
    assert shape.memory_bytes == 31205621 * 1024


def test_old_driver_product_name_resolves_to_the_catalog_entry(make_node):
    # GFD with old drivers writes A100-SXM4-40GB (no NVIDIA- prefix); the catalog lists it as an alias
    shape = node_from_manifest(make_node("g", "A100-SXM4-40GB", 8)).shape
    assert shape.gpu.product == "NVIDIA-A100-SXM4-40GB" and shape.gpu.known


def test_unknown_product_takes_its_memory_from_the_gfd_label(make_node):
    shape = node_from_manifest(make_node("g", "NVIDIA-Z9000", 2, memory_mib=49152, compute="9.0")).shape
    assert shape.gpu is not None and not shape.gpu.known
    assert shape.gpu.product == "NVIDIA-Z9000"
    assert shape.gpu.memory_bytes == 48 * 2**30
    assert shape.gpu.compute_capability == "9.0"
    assert shape.gpus_per_node == 2
    # conservative: no faster than the slowest catalog GPU
    slowest = min(g.memory_bandwidth_gbps for g in load_catalog().gpus.values())
    assert shape.gpu.memory_bandwidth_gbps == slowest


def test_unknown_product_without_a_memory_label_offers_no_gpus(make_node):
    """Nothing can be sized against a GPU of unknown memory: the GPU has memory 0 and the node offers the
    planner no GPUs (as a node whose device plugin is not running) instead of a zero-memory pool."""
    labels = {"nvidia.com/gpu.product": "NVIDIA-Z9000", "nvidia.com/gpu.compute.major": "9",
              "nvidia.com/gpu.compute.minor": "0"}
    gpu = _unknown_gpu("NVIDIA-Z9000", labels)
    assert gpu.memory_gib == 0 and gpu.memory_bytes == 0 and not gpu.known
    assert gpu.compute_capability == "9.0"
    assert _node_gpu(labels) is None
    shape = node_from_manifest(make_node("g", "NVIDIA-Z9000", 2, compute="9.0")).shape  # no gpu.memory label
    assert shape.gpu is None and shape.gpus_per_node == 0


@pytest.mark.parametrize("bad", ["abc", "-5", "1e400", "12.5", "0", "", "nan", "4e4", "９９", "9" * 5000])
def test_unknown_product_with_a_malformed_memory_label_offers_no_gpus(make_node, bad):
    labels = {"nvidia.com/gpu.product": "NVIDIA-Z9000", "nvidia.com/gpu.memory": bad}
    assert _unknown_gpu("NVIDIA-Z9000", labels).memory_gib == 0
    manifest = make_node("g", "NVIDIA-Z9000", 2, labels={"nvidia.com/gpu.memory": bad})
    shape = node_from_manifest(manifest).shape
    assert shape.gpu is None and shape.gpus_per_node == 0


def test_unknown_product_compute_capability_comes_from_gfd_labels_and_tolerates_garbage():
    def cc(**labels):
        return _unknown_gpu("NVIDIA-Z9000", {"nvidia.com/gpu.memory": "49152", **{
            f"nvidia.com/gpu.compute.{k}": v for k, v in labels.items()}}).compute_capability

    assert cc(major="12", minor="0") == "12.0"
    assert cc(major="8", minor="9") == "8.9"
    assert cc(major="10") == "10.0"  # no minor label: .0
    assert cc(major="9", minor="x") == "9.0"
    assert cc(major="abc", minor="0") is None
    assert cc(major="-9", minor="0") is None
    assert cc() is None


def test_unknown_product_speeds_are_the_catalogs_slowest(make_node):
    gpus = load_catalog().gpus.values()
    gpu = node_from_manifest(make_node("g", "NVIDIA-Z9000", 1, memory_mib=24576, compute="8.9")).shape.gpu
    assert gpu.memory_gib == 24.0
    assert gpu.memory_bandwidth_gbps == min(g.memory_bandwidth_gbps for g in gpus)
    assert gpu.tensor_tflops_16bit == min(g.tensor_tflops_16bit for g in gpus if g.tensor_tflops_16bit)
    assert gpu.bf16_tflops is None and gpu.fp8_tflops is None and gpu.int8_tops is None
    assert gpu.interconnect == "pcie"


def test_planning_next_to_an_unknown_product_without_memory_does_not_crash(make_node, make_inventory, make_spec):
    from llama_operator.planner import plan

    inv = make_inventory(make_node("z", "NVIDIA-Z9000", 8, compute="9.0"), make_node("l4", "NVIDIA-L4", 1))
    p = plan(make_spec(), inv)  # before: ZeroDivisionError on the zero-memory GPU
    assert p.chosen is not None and p.chosen.pool.gpu.product == "NVIDIA-L4"
    assert all(c.pool.gpu is None or c.pool.gpu.product != "NVIDIA-Z9000" for c in p.candidates)


# --- GFD's memory label on catalog products ----------------------------------------------------------


def test_a_larger_memory_label_does_not_raise_the_catalog_figure(make_node):
    # A 16 GB V100 on an R530+ driver: GFD labels 16384 MiB, counting memory the driver reserves; the
    # catalog keeps the 16160 MiB older drivers report, which is what a model can have.
    catalog_gpu = load_catalog().find_gpu("Tesla-V100-SXM2-16GB")
    gpu = node_from_manifest(make_node("v", "Tesla-V100-SXM2-16GB", 8, memory_mib=16384)).shape.gpu
    assert gpu is catalog_gpu and gpu.memory_gib == round(16160 / 1024, 2)


def test_a_smaller_memory_label_wins(make_node):
    # e.g. a MIG slice or an ECC setting: the node has less than the catalog says
    catalog_gpu = load_catalog().find_gpu("NVIDIA-A100-SXM4-80GB")
    gpu = node_from_manifest(make_node("a", "NVIDIA-A100-SXM4-80GB", 1, memory_mib=40960)).shape.gpu
    assert gpu.memory_gib == 40.0 and gpu.memory_bytes == 40 * 2**30
    assert gpu == replace(catalog_gpu, memory_gib=40.0)  # everything else is the catalog entry's
    assert gpu.known and gpu.product == "NVIDIA-A100-SXM4-80GB" and gpu.bf16_tflops == catalog_gpu.bf16_tflops


def test_a_memory_label_matching_the_catalog_keeps_the_catalog_value(make_node):
    catalog_gpu = load_catalog().find_gpu("NVIDIA-H100-80GB-HBM3")  # 79.65 GiB = 81559 MiB, rounded
    gpu = node_from_manifest(make_node("h", "NVIDIA-H100-80GB-HBM3", 8, memory_mib=81559)).shape.gpu
    assert gpu is catalog_gpu


@pytest.mark.parametrize("bad", ["abc", "-5", "1e400", "12.5", "0", "", " ", "nan", "inf", "0x4000", "９９",
                                 "9" * 5000])
def test_a_malformed_memory_label_is_ignored(make_node, bad):
    catalog_gpu = load_catalog().find_gpu("NVIDIA-L4")
    manifest = make_node("l", "NVIDIA-L4", 1, labels={"nvidia.com/gpu.memory": bad})
    assert node_from_manifest(manifest).shape.gpu is catalog_gpu


def test_nodes_with_different_memory_labels_form_separate_groups(make_node, make_inventory):
    inv = make_inventory(make_node("a", "NVIDIA-A100-SXM4-80GB", 4, memory_mib=40960),
                         make_node("b", "NVIDIA-A100-SXM4-80GB", 4, memory_mib=40960),
                         make_node("c", "NVIDIA-A100-SXM4-80GB", 4, memory_mib=81920))
    by_memory = {g.shape.gpu.memory_gib: sorted(g.nodes) for g in inv.groups()}
    assert by_memory == {40.0: ["a", "b"], 80.0: ["c"]}
    # GPUs built from labels compare and hash by value, so they work as dict / cache keys
    gpus = [inv.nodes[n].shape.gpu for n in ("a", "b", "c")]
    assert gpus[0] == gpus[1] and hash(gpus[0]) == hash(gpus[1]) and gpus[0] != gpus[2]
    assert len({g: None for g in gpus}) == 2


def test_amd_gpus_keep_the_catalog_memory(make_node):
    # The AMD labeller's amd.com/gpu.vram is whole GiB ("192G" for 191.69 GiB) and GFD's label is NVIDIA's
    manifest = make_node("mi", labels={"amd.com/gpu.product-name": "AMD_Instinct_MI300X_OAM",
                                       "amd.com/gpu.vram": "192G", "nvidia.com/gpu.memory": "1024"})
    manifest["status"]["allocatable"]["amd.com/gpu"] = "8"
    gpu = node_from_manifest(manifest).shape.gpu
    assert gpu is load_catalog().find_gpu("AMD_Instinct_MI300X_OAM") and gpu.memory_gib == 191.69


@pytest.mark.parametrize("label, product, memory_gib, cc", [
    ("NVIDIA-B200", "NVIDIA-B200", 179.06, "10.0"),
    ("NVIDIA-H20", "NVIDIA-H20", 95.58, "9.0"),
    ("NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition", "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition", 95.59, "12.0"),
    ("NVIDIA-RTX-PRO-6000-Blackwell-Workstation-Edition", "NVIDIA-RTX-PRO-6000-Blackwell-Workstation-Edition",
     95.59, "12.0"),
])
def test_new_products_resolve_from_their_gfd_labels(make_node, label, product, memory_gib, cc):
    gpu = node_from_manifest(make_node("g", label, 8)).shape.gpu
    assert gpu.known and gpu.product == product
    assert gpu.memory_gib == memory_gib and gpu.compute_capability == cc


def test_mi325x_node_resolves_from_the_amd_labeller_key(make_node):
    manifest = make_node("mi", labels={"amd.com/gpu.product-name": "AMD_Instinct_MI325_OAM"})
    manifest["status"]["allocatable"]["amd.com/gpu"] = "8"
    shape = node_from_manifest(manifest).shape
    assert shape.gpu.product == "AMD_Instinct_MI325_OAM" and shape.gpu.known and shape.gpus_per_node == 8
    assert shape.gpu.vendor == "amd" and shape.gpu.resource_name == "amd.com/gpu"


def test_amd_node_uses_the_amd_labeller_key(make_node):
    manifest = make_node("mi", labels={"amd.com/gpu.product-name": "AMD_Instinct_MI300X_OAM"})
    manifest["status"]["allocatable"]["amd.com/gpu"] = "8"
    shape = node_from_manifest(manifest).shape
    assert shape.gpu.product == "AMD_Instinct_MI300X_OAM" and shape.gpus_per_node == 8


def test_gpu_label_without_allocatable_gpus_is_a_cpu_node(make_node):
    # e.g. the device plugin is not running yet: the node cannot run GPU pods
    manifest = make_node("g", "NVIDIA-L4", 1)
    del manifest["status"]["allocatable"]["nvidia.com/gpu"]
    shape = node_from_manifest(manifest).shape
    assert shape.gpu is None and shape.gpus_per_node == 0


@pytest.mark.parametrize("ready, unschedulable, expected", [
    (True, False, True), (False, False, False), (True, True, False),
])
def test_not_ready_and_cordoned_nodes_are_not_ready(make_node, ready, unschedulable, expected):
    assert node_from_manifest(make_node("n", ready=ready, unschedulable=unschedulable)).ready is expected


def test_unknown_ready_status_is_not_ready(make_node):
    manifest = make_node("n")
    manifest["status"]["conditions"][-1]["status"] = "Unknown"
    assert not node_from_manifest(manifest).ready


def test_a_node_that_never_reported_ready_is_not_ready(make_node):
    """A kubelet that has not posted its Ready condition yet: the scheduler keeps pods off that node."""
    manifest = make_node("n")
    manifest["status"]["conditions"] = [c for c in manifest["status"]["conditions"] if c["type"] != "Ready"]
    assert not node_from_manifest(manifest).ready
    del manifest["status"]["conditions"]
    assert not node_from_manifest(manifest).ready


def test_cpu_bandwidth_label_overrides_the_default(make_node):
    default = load_catalog().cpu
    assert node_from_manifest(make_node("c")).shape.cpu_bandwidth_gbps == default.memory_bandwidth_gbps
    fast = make_node("c", labels={default.bandwidth_label: "120"})
    assert node_from_manifest(fast).shape.cpu_bandwidth_gbps == 120
    garbage = make_node("c", labels={default.bandwidth_label: "fast"})
    assert node_from_manifest(garbage).shape.cpu_bandwidth_gbps == default.memory_bandwidth_gbps


def test_alike_nodes_form_one_group(make_node, make_inventory):
    nodes = [make_node(f"l4-{i}", "NVIDIA-L4", 1) for i in range(10)] + [make_node("cpu", cpu="8", memory="32Gi")]
    groups = make_inventory(*nodes).groups()
    assert len(groups) == 2
    gpu_group = next(g for g in groups if g.shape.gpu is not None)
    assert sorted(gpu_group.nodes) == [f"l4-{i}" for i in range(10)]
    assert gpu_group.free_gpus == {1: 10}
    # the per-node hostname label does not split the group
    assert "kubernetes.io/hostname" not in gpu_group.shape.label_dict()


def test_nodes_differing_in_labels_or_taints_form_separate_groups(make_node, make_inventory):
    inv = make_inventory(
        make_node("a", "NVIDIA-L4", 1),
        make_node("b", "NVIDIA-L4", 1, labels={"pool": "batch"}),
        make_node("c", "NVIDIA-L4", 1, taints=[{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]),
    )
    assert len(inv.groups()) == 3


def test_groups_leave_out_not_ready_and_cordoned_nodes(make_node, make_inventory):
    inv = make_inventory(make_node("ok", "NVIDIA-L4", 1), make_node("down", "NVIDIA-L4", 1, ready=False),
                         make_node("cordoned", "NVIDIA-L4", 1, unschedulable=True))
    (group,) = inv.groups()
    assert group.nodes == ["ok"]


def test_example_clusters_load(make_inventory):
    for path in sorted(CLUSTERS.glob("*.yaml")):
        inv = make_inventory(*cluster_nodes(path.name))
        assert inv.nodes and inv.groups(), path.name
    mixed = make_inventory(*cluster_nodes("mixed.yaml"))
    products = {g.shape.gpu.product if g.shape.gpu else None for g in mixed.groups()}
    assert products == {"NVIDIA-L4", "NVIDIA-A10G", "Tesla-T4", "NVIDIA-L40S", None}


# --- Pods ----------------------------------------------------------------------------------------------


def test_bound_pods_take_gpus_cpu_and_memory(make_node, make_pod, make_inventory):
    inv = make_inventory(make_node("a", "NVIDIA-A100-SXM4-80GB", 8, cpu="96", memory="1000Gi"),
                         pods=[make_pod("a", gpus=3, cpu="10", memory="100Gi"),
                               make_pod("a", gpus=2, cpu="500m", name="second")])
    assert inv.free["a"] == (3, 96000 - 10500, 900 * 2**30)
    (group,) = inv.groups()
    assert group.free_gpus == {3: 1}


def test_finished_and_unbound_pods_take_nothing(make_node, make_pod, make_inventory):
    unbound = make_pod("a", gpus=1)
    del unbound["spec"]["nodeName"]
    inv = make_inventory(make_node("a", "NVIDIA-L4", 1),
                         pods=[make_pod("a", gpus=1, phase="Succeeded"), make_pod("a", gpus=1, phase="Failed"),
                               unbound])
    assert inv.free["a"][0] == 1
    assert pod_usage(unbound) is None


def test_requests_win_over_limits(make_pod):
    pod = make_pod("a", gpus=2)
    pod["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] = "1"
    assert pod_usage(pod).gpus == 1


def test_gpus_are_summed_over_containers_and_never_go_negative(make_node, make_pod, make_inventory):
    pod = make_pod("a", gpus=1)
    pod["spec"]["containers"].append({"name": "d", "resources": {"limits": {"nvidia.com/gpu": "2"}}})
    assert pod_usage(pod).gpus == 3
    inv = make_inventory(make_node("a", "NVIDIA-L4", 1), pods=[pod])
    assert inv.free["a"][0] == 0


def test_pods_on_unknown_nodes_are_ignored(make_node, make_pod, make_inventory):
    inv = make_inventory(make_node("a", "NVIDIA-L4", 1), pods=[make_pod("elsewhere", gpus=1)])
    assert inv.free["a"][0] == 1


# --- reserve -------------------------------------------------------------------------------------------


def test_reserve_takes_gpus_first_fit_in_name_order(make_node, make_inventory):
    inv = make_inventory(make_node("b", "NVIDIA-A100-SXM4-80GB", 8), make_node("a", "NVIDIA-A100-SXM4-80GB", 8))
    after = inv.reserve(lambda n: n.shape.gpu is not None and n.shape.gpu.product == "NVIDIA-A100-SXM4-80GB", 3, 4)
    assert after.free["a"][0] == 0  # two replicas of 4 on a
    assert after.free["b"][0] == 4  # the third on b
    (group,) = after.groups()
    assert group.free_gpus == {0: 1, 4: 1}


def test_reserve_returns_a_copy(make_node, make_inventory):
    inv = make_inventory(make_node("a", "NVIDIA-L4", 1))
    inv.groups()  # computed before reserve: the copy must not reuse it
    after = inv.reserve(lambda n: n.shape.gpu is not None and n.shape.gpu.product == "NVIDIA-L4", 1, 1)
    assert inv.free["a"][0] == 1 and inv.groups()[0].free_gpus == {1: 1}
    assert after.free["a"][0] == 0 and after.groups()[0].free_gpus == {0: 1}


def test_reserve_skips_nodes_too_small_other_products_and_not_ready_nodes(make_node, make_pod, make_inventory):
    inv = make_inventory(
        make_node("a-partly-used", "NVIDIA-A100-SXM4-80GB", 8),
        make_node("b-down", "NVIDIA-A100-SXM4-80GB", 8, ready=False),
        make_node("c-h100", "NVIDIA-H100-80GB-HBM3", 8),
        make_node("d-free", "NVIDIA-A100-SXM4-80GB", 8),
        pods=[make_pod("a-partly-used", gpus=6)],
    )
    after = inv.reserve(lambda n: n.shape.gpu is not None and n.shape.gpu.product == "NVIDIA-A100-SXM4-80GB", 1, 4)
    assert after.free["a-partly-used"][0] == 2  # only 2 free: a 4-GPU replica does not fit
    assert after.free["b-down"][0] == 8
    assert after.free["c-h100"][0] == 8
    assert after.free["d-free"][0] == 4


def test_reserve_more_than_fits_takes_what_there_is(make_node, make_inventory):
    inv = make_inventory(make_node("a", "NVIDIA-L4", 1), make_node("b", "NVIDIA-L4", 1))
    after = inv.reserve(lambda n: n.shape.gpu is not None and n.shape.gpu.product == "NVIDIA-L4", 5, 1)
    assert after.free["a"][0] == 0 and after.free["b"][0] == 0


def test_reserve_cpu_replicas_takes_cores_and_memory(make_node, make_inventory):
    inv = make_inventory(make_node("a", cpu="32", memory="128Gi"), make_node("gpu", "NVIDIA-L4", 1))
    after = inv.reserve(lambda n: n.shape.gpu is None, 1, 0, cpu_millis=16000, memory_bytes=10 * 2**30)
    assert after.free["a"] == (0, 16000, 118 * 2**30)
    assert after.free["gpu"] == inv.free["gpu"]
