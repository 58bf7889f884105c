"""`llama-operator`: plan, render, estimate, crd (and run, sandbox: the operator itself).

Exit codes: 0 success (for `plan` and `render`: feasible), 2 `plan` or `render` found no feasible candidate, 1 bad input (a
message naming the problem, never a traceback).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from . import api
from .catalog import load_catalog
from .plan_table import render_plan_table
from .loading import (UserError, load_cluster_file, load_deployment_objects, load_deployments, load_live_cluster,
                      shortened)
from .slo_options import add_slo_options, slo_run_options
from .units import format_bytes, format_seconds

EXIT_OK, EXIT_BAD_INPUT, EXIT_INFEASIBLE = 0, 1, 2


# --- plan -----------------------------------------------------------------------------------------------


def _load_inventory(args):
    """The cluster to plan on: --cluster FILE, else the current kubeconfig's (and how to name it)."""
    if args.cluster:
        inventory, count = load_cluster_file(args.cluster)
        return inventory, f"{args.cluster} ({count} nodes)"
    inventory, count = load_live_cluster()
    return inventory, f"the current kubeconfig's cluster ({count} nodes)"


def _plan_each(deployments, inventory) -> list:
    """A plan per deployment, in file order; later deployments see the GPUs earlier ones take (as the
    operator does: a plan in force reserves its hardware)."""
    from .planner import plan as make_plan
    from .placement import reserve_plan

    plans = []
    for spec in deployments:
        p = make_plan(spec, inventory)
        plans.append(p)
        if p.feasible:
            inventory = reserve_plan(inventory, spec, p.chosen.to_chosen_plan(), spec.replicas)
    return plans


def cmd_plan(args) -> int:
    deployments = load_deployments(args.file)
    inventory, cluster_label = _load_inventory(args)
    plans = _plan_each([spec for _, spec in deployments], inventory)
    results = [(name, spec, p) for (name, spec), p in zip(deployments, plans)]
    worst = EXIT_OK if all(p.feasible for p in plans) else EXIT_INFEASIBLE
    if args.output == "table":
        print("\n\n".join(render_plan_table(n, s, p, cluster_label) for n, s, p in results))
    else:
        docs = [{"name": n, **p.to_dict()} for n, _, p in results]
        payload: Any = docs[0] if len(docs) == 1 else docs
        if args.output == "json":
            print(json.dumps(payload, indent=2))
        else:
            print(yaml.safe_dump(payload, sort_keys=False), end="")
    return worst


# --- render ---------------------------------------------------------------------------------------------

#: The owner uid written when neither the file nor the cluster gives the LlamaDeployment's (it has none
#: before it is created); the operator's objects carry the real one.
PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


def cmd_render(args) -> int:
    """The objects the operator would apply for each LlamaDeployment, as one YAML stream: the operator's
    own planner and renderer, on the same cluster input as `plan`."""
    from .placement import with_pod_tolerations
    from .render import Owner, render

    objects = load_deployment_objects(args.file)
    inventory, _ = _load_inventory(args)
    plans = _plan_each([spec for _, _, spec in objects], inventory)
    out, worst = [], EXIT_OK
    for (name, meta, spec), p in zip(objects, plans):
        namespace = meta.get("namespace") or args.namespace
        if p.chosen is None:
            worst = EXIT_INFEASIBLE
            print(f"{name}: no feasible plan: {p.fallback_reason}", file=sys.stderr)
            continue
        uid = meta.get("uid") or PLACEHOLDER_UID
        header = f"# LlamaDeployment {namespace}/{name}: {p.summary()}"
        if uid == PLACEHOLDER_UID:
            header += "\n# ownerReferences carry a placeholder uid: the LlamaDeployment has none until it is created"
        chosen = p.chosen.to_chosen_plan()
        docs = render(Owner(name=name, namespace=namespace, uid=uid), with_pod_tolerations(spec, inventory, chosen),
                      chosen)
        out.append(header + "\n" + "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs))
    if out:
        print("---\n".join(out), end="")
    return worst


# --- estimate -------------------------------------------------------------------------------------------


def cmd_estimate(args) -> int:
    from .engines import release_for
    from .estimate import Hardware, Workload, estimate

    catalog = load_catalog()
    if args.model not in catalog.models:
        raise UserError(f"--model: unknown model {args.model!r}; known: {', '.join(catalog.models)}")
    model = catalog.model(args.model)
    if args.quantization not in catalog.quantizations:
        raise UserError(f"--quantization: unknown {args.quantization!r}; known: {', '.join(catalog.quantizations)}")
    quant = catalog.quantizations[args.quantization]
    if quant.runtime != args.runtime:
        raise UserError(f"--runtime: {args.quantization} is served by {quant.runtime}, not {args.runtime}")
    note = None
    if args.quantization not in model.variants():
        if release_for(model, args.runtime) is None:
            raise UserError(f"--quantization: {args.model} is not published as {args.quantization}, and no pinned "
                            f"{args.runtime} release serves its architecture ({model.architecture}); it is "
                            f"published as {', '.join(model.variants())}")
        note = (f"{args.model} is not published as {args.quantization}: estimated from the architecture and the "
                f"format; `plan` considers only published variants ({', '.join(model.variants())})")
    if args.gpu == "cpu":
        if args.cpu_cores < 1:
            raise UserError(f"--cpu-cores: must be at least 1, got {args.cpu_cores}")
        if args.cpu_bandwidth is not None and args.cpu_bandwidth <= 0:
            raise UserError(f"--cpu-bandwidth: must be a positive number of GB/s, got {args.cpu_bandwidth:g}")
        if args.runtime == "vllm":
            raise UserError("--gpu cpu: vLLM needs a GPU; use --runtime llamacpp for CPU")
        hw = Hardware(gpu=None, cpu_cores=args.cpu_cores,
                      cpu_bandwidth_gbps=args.cpu_bandwidth or catalog.cpu.memory_bandwidth_gbps)
    else:
        gpu = catalog.find_gpu(args.gpu)
        if gpu is None:
            raise UserError(f"--gpu: unknown GPU {args.gpu!r}; known: {', '.join(sorted(catalog.gpus))} (or cpu)")
        if args.runtime == "vllm" and args.gpus >= 1 and model.arch.kv_heads % args.gpus:
            raise UserError(f"--gpus: vLLM's tensor parallelism must divide {args.model}'s {model.arch.kv_heads} KV "
                            f"heads; use 1, 2, 4 or 8")
        hw = Hardware(gpu=gpu, gpu_count=args.gpus)
    for flag, value, low in (("--context", args.context, 1), ("--concurrency", args.concurrency, 1),
                             ("--prompt-tokens", args.prompt_tokens, 1), ("--gpus", args.gpus, 1)):
        if value < low:
            raise UserError(f"{flag}: must be at least {low}, got {value}")
    if args.context > model.arch.max_context:
        raise UserError(f"--context: {args.model} serves at most {model.arch.max_context} tokens")
    kv = args.kv_cache_dtype
    if kv == "fp8" and args.runtime != "vllm" or kv == "q8_0" and args.runtime != "llamacpp":
        raise UserError(f"--kv-cache-dtype: {kv} is not a {args.runtime} KV cache type")
    workload = Workload(context_length=args.context, concurrency=args.concurrency,
                        prompt_tokens=min(args.prompt_tokens, args.context), kv_cache_dtype=kv)
    e = estimate(model, quant, hw, workload)
    data = e.to_dict()
    if note:
        data["note"] = note
    if args.output == "json":
        print(json.dumps(data, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        print(f"{args.model} {args.quantization} on {args.runtime}, {hw.describe()}")
        print(f"  weights   {format_bytes(e.weights_bytes)}")
        print(f"  KV cache  {format_bytes(e.kv_cache_bytes)} ({args.context} tokens x {args.concurrency})")
        print(f"  overhead  {format_bytes(e.overhead_bytes)}")
        where = f"{format_bytes(e.per_gpu_bytes)} per GPU" if hw.gpu is not None else "of RAM"
        print(f"  total     {format_bytes(e.total_bytes)} ({where})")
        print(f"  TTFT      {format_seconds(e.ttft_seconds)} for {workload.prompt_tokens} prompt tokens")
        print(f"  TPOT      {format_seconds(e.tpot_seconds)} ({e.decode_tokens_per_second:.1f} tokens/s per sequence)")
        if note:
            print(f"  note      {note}")
    return EXIT_OK


# --- crd ------------------------------------------------------------------------------------------------


def cmd_crd(args) -> int:
    from .crd import render_crd

    text = render_crd()
    if args.stdout:
        sys.stdout.write(text)
        return EXIT_OK
    target = Path(args.output)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}")
    return EXIT_OK


# --- run ------------------------------------------------------------------------------------------------


def _image_mirrors(pairs: list[str]):
    """--image PINNED=MIRROR[=UID[:GID]] values, each PINNED an image of the engine catalog."""
    from .engines import releases
    from .render import Images

    pinned = sorted({image for r in releases() for image in r.images.values()})
    mirrors = []
    for pair in pairs:
        source, eq, mirror = pair.partition("=")
        if not eq or not source or not mirror:
            raise UserError(f"--image {pair!r}: expected PINNED=MIRROR, e.g. {pinned[0]}=registry.local/...")
        if source not in pinned:
            raise UserError(f"--image {pair!r}: {source} is not a pinned engine image; pinned: {', '.join(pinned)}")
        mirrors.append((source, mirror))
    try:
        return Images(tuple(mirrors))
    except ValueError as e:  # a malformed =UID[:GID]
        raise UserError(str(e)) from None


def _bind_address(flag: str, value: str) -> str:
    """An IP address to listen on (IPv4 or IPv6), as --metrics-address and --health-address take it."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise UserError(f"{flag} {value!r}: expected an IP address to listen on, e.g. 0.0.0.0 (every IPv4 "
                        "interface), :: (every interface) or 127.0.0.1 (this host only)") from None


#: A taint key: an optional DNS subdomain prefix and "/", then a name (as Kubernetes validates label keys).
_TAINT_KEY = re.compile(r"^(?:(?=.{1,253}/)[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*/)?"
                        r"(?=.{1,63}$)[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def _forbidden_tolerations(keys: list[str] | None) -> frozenset[str]:
    """--forbid-toleration KEY...: the taint keys LlamaDeployments may not tolerate. Not given: the planner's
    defaults (the control-plane taints); given only empty (`--forbid-toleration=`): none."""
    from .placement import DEFAULT_FORBIDDEN_TOLERATIONS

    if keys is None:
        return DEFAULT_FORBIDDEN_TOLERATIONS
    for key in keys:
        if key and not _TAINT_KEY.match(key):
            raise UserError(f"--forbid-toleration {key!r}: not a taint key "
                            "(e.g. node-role.kubernetes.io/control-plane)")
    return frozenset(k for k in keys if k)


def cmd_run(args) -> int:
    import asyncio
    from datetime import timedelta

    from .kubeclient import ConfigError
    from .state import Settings
    from .runner import RunOptions, configure_logging, run_async, tune_gc

    if args.metrics_port == args.health_port:
        raise UserError("--metrics-port and --health-port must differ")
    metrics_address = _bind_address("--metrics-address", args.metrics_address)
    health_address = _bind_address("--health-address", args.health_address)
    forbidden = _forbidden_tolerations(args.forbid_toleration)
    images = _image_mirrors(args.image or [])
    slo, slo_interval, slo_source = slo_run_options(args)
    settings = Settings(upgrade_delay=timedelta(seconds=args.upgrade_delay), resync_seconds=args.resync,
                        images=images, forbidden_tolerations=forbidden, slo=slo, slo_interval_seconds=slo_interval)
    namespaces = [] if args.all_namespaces or not args.namespace else list(args.namespace)
    options = RunOptions(
        kubeconfig=args.kubeconfig,
        namespaces=namespaces,
        metrics_port=args.metrics_port,
        metrics_host=metrics_address,
        health_port=args.health_port,
        health_host=health_address,
        peering=None if args.standalone or not args.peering else args.peering,
        settings=settings,
        pods_all_namespaces=bool(namespaces) and args.pods_all_namespaces,
        **slo_source,
    )
    configure_logging(verbose=args.verbose, json_format=args.log_format == "json")
    tune_gc()
    try:
        asyncio.run(run_async(options))
    except ConfigError as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        pass
    return EXIT_OK


# --- sandbox --------------------------------------------------------------------------------------------

SANDBOX_DEFAULT_EXAMPLES = ["chat.yaml", "chat-11b-vision.yaml", "vision-90b-on-l4.yaml", "70b-tight-tpot.yaml",
                            "tiny-cpu.yaml", "impossible.yaml"]


def cmd_sandbox(args) -> int:
    try:
        from .sandbox.demo import EXAMPLES, run_sandbox
    except ImportError as e:
        raise UserError(f"the sandbox needs the optional extra: pip install 'llama-operator[sandbox]' ({e})") from None
    cluster = Path(args.cluster) if args.cluster else EXAMPLES / "clusters" / "mixed.yaml"
    files = [Path(f) for f in args.file] if args.file else [EXAMPLES / f for f in SANDBOX_DEFAULT_EXAMPLES]
    for path in [cluster, *files]:
        if not path.is_file():
            raise UserError(f"{path}: no such file")
    if args.serve and not args.kubeconfig:
        raise UserError("--serve needs --kubeconfig PATH, where the sandbox writes the kubeconfig to use")
    load_cluster_file(str(cluster))  # fail early, with a clear message, on a bad cluster file
    for path in files:
        load_deployments(str(path))
    join = None if args.no_scenario else Path(args.join) if args.join else EXAMPLES / "clusters" / "h100-8x.yaml"
    if join is not None and not join.is_file():
        raise UserError(f"{join}: no such file")
    slo = None if args.no_scenario else (EXAMPLES / "slo-loop.yaml", EXAMPLES / "clusters" / "slo-loop.yaml")
    finetunes = None if args.no_scenario else (EXAMPLES / "adapters.yaml", EXAMPLES / "clusters" / "fine-tunes.yaml")
    speculative = None if args.no_scenario else (EXAMPLES / "speculative.yaml", EXAMPLES / "clusters" / "l40s.yaml")
    multinode = None if args.no_scenario else (EXAMPLES / "multinode-405b.yaml",
                                               EXAMPLES / "clusters" / "h100-8x-pair.yaml")
    code = run_sandbox(cluster, files, serve=args.serve, kubeconfig_path=Path(args.kubeconfig) if args.kubeconfig
                       else None, upgrade_delay=args.upgrade_delay, timeout=args.timeout, join=join, slo=slo,
                       finetunes=finetunes)
    if multinode is None or args.serve:
        return code
    # Speculative decoding, then replicas across nodes, on a sandbox of their own: the same cluster, LeaderWorkerSet
    # installed as the second starts. There the SLO loop watches only their few deployments (in the first, a dozen
    # keep the emulator busy and a draft takes minutes to be judged, not seconds).
    print()
    return run_sandbox(cluster, [], serve=False, kubeconfig_path=None, upgrade_delay=args.upgrade_delay,
                       timeout=args.timeout, speculative=speculative, multinode=multinode) or code


# --- main -----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: usage and exit 1 (bad input), not 2
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llama-operator", description="Serve Llama models on the hardware you have.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("plan", help="what the operator would run for a LlamaDeployment, and why")
    p.add_argument("-f", "--file", required=True, help="a YAML file with one or more LlamaDeployments")
    p.add_argument("--cluster", help="a file of Node manifests (kubectl get nodes -o yaml); default: the live "
                   "cluster of the current kubeconfig")
    p.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    p.set_defaults(func=cmd_plan)

    e = sub.add_parser("estimate", help="memory and latency of one variant on given hardware")
    e.add_argument("--model", required=True)
    e.add_argument("--quantization", required=True)
    e.add_argument("--runtime", required=True, choices=["vllm", "llamacpp"])
    e.add_argument("--gpu", required=True, help="GPU product (GFD name or alias) or cpu")
    e.add_argument("--gpus", type=int, default=1, help="GPUs per replica")
    e.add_argument("--context", type=int, default=8192)
    e.add_argument("--concurrency", type=int, default=1)
    e.add_argument("--prompt-tokens", type=int, default=512)
    e.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "q8_0"], default="auto")
    e.add_argument("--cpu-cores", type=int, default=16,
                   help="with --gpu cpu: the threads llama.cpp runs (plan gives it the node's cores, at most 16)")
    e.add_argument("--cpu-bandwidth", type=float, default=None,
                   help="with --gpu cpu: the node's peak memory bandwidth, GB/s (spec sheet: channels x MT/s x 8 B)")
    e.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    e.set_defaults(func=cmd_estimate)

    r = sub.add_parser("run", help="run the operator against the current kubeconfig or in-cluster config")
    scope = r.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    scope.add_argument("-n", "--namespace", action="append", help="watch this namespace (repeatable)")
    r.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config, then $KUBECONFIG)")
    r.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (/metrics)")
    r.add_argument("--metrics-address", default="0.0.0.0", metavar="IP",
                   help="address the metrics endpoint listens on (default 0.0.0.0, every IPv4 interface: in a pod "
                   "Prometheus scrapes the pod IP; 127.0.0.1 keeps it to this host, :: for IPv6)")
    r.add_argument("--health-port", type=int, default=8081, help="liveness endpoint port (/healthz)")
    r.add_argument("--health-address", default="0.0.0.0", metavar="IP",
                   help="address the liveness endpoint listens on (default 0.0.0.0: the kubelet probes the pod IP)")
    r.add_argument("--pods-all-namespaces", action="store_true",
                   help="with --namespace: still read the Pods of every namespace (needs cluster-wide list and "
                   "watch on pods), so GPUs that other namespaces' pods hold count as taken; without it only the "
                   "watched namespaces' Pods are seen (always all with --all-namespaces)")
    r.add_argument("--forbid-toleration", action="append", metavar="KEY",
                   help="a taint key that LlamaDeployments' own tolerations never tolerate, not even "
                   "`operator: Exists` without a key (repeatable; default: node-role.kubernetes.io/control-plane "
                   "and node-role.kubernetes.io/master; `--forbid-toleration=` alone forbids none)")
    r.add_argument("--log-format", choices=["plain", "json"], default="plain")
    peer = r.add_mutually_exclusive_group()
    peer.add_argument("--peering", help="kopf peering object name: with several replicas only one acts")
    peer.add_argument("--standalone", action="store_true", help="no peering (a single replica)")
    r.add_argument("--upgrade-delay", type=float, default=120.0,
                   help="seconds new capacity must stay before a deployment moves up to a better variant")
    r.add_argument("--resync", type=float, default=300.0, help="seconds between periodic re-plans")
    r.add_argument("--image", action="append", metavar="PINNED=MIRROR[=UID[:GID]]",
                   help="pull a pinned engine image (docs/engines.md) from a mirror of the same release, e.g. "
                   "vllm/vllm-openai:v0.34.0=registry.local/vllm-openai:v0.34.0; =UID[:GID]: the mirror runs as "
                   "that non-root user (docs/security.md) (repeatable)")
    add_slo_options(r)
    r.add_argument("-v", "--verbose", action="store_true")
    r.set_defaults(func=cmd_run)

    sb = sub.add_parser("sandbox", help="run the operator against a local API emulator with example nodes")
    sb.add_argument("--cluster", help="example cluster: a file of Node manifests (default: the bundled "
                    "examples/clusters/mixed.yaml, installed with the package)")
    sb.add_argument("-f", "--file", action="append", help="LlamaDeployments to apply (repeatable; default: the "
                    f"bundled examples {', '.join(SANDBOX_DEFAULT_EXAMPLES)})")
    sb.add_argument("--join", help="nodes that join after the first plans, then leave again (default: the "
                    "bundled examples/clusters/h100-8x.yaml)")
    sb.add_argument("--no-scenario", action="store_true", help="skip the scenarios (nodes join and leave; the SLO "
                    "loop; fine-tuned models; speculative decoding; replicas across nodes)")
    sb.add_argument("--serve", action="store_true", help="keep running for kubectl (needs --kubeconfig)")
    sb.add_argument("--kubeconfig", help="write the emulator's kubeconfig here once the API answers")
    sb.add_argument("--upgrade-delay", type=float, default=5.0, help="seconds before moving up to a better variant")
    sb.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the deployments to settle")
    sb.set_defaults(func=cmd_sandbox)

    rn = sub.add_parser("render", help="the objects the operator would apply for each LlamaDeployment (YAML)")
    rn.add_argument("-f", "--file", required=True, help="a YAML file with one or more LlamaDeployments")
    rn.add_argument("--cluster", help="a file of Node manifests (kubectl get nodes -o yaml); default: the live "
                    "cluster of the current kubeconfig")
    rn.add_argument("-n", "--namespace", default="default",
                    help="namespace of LlamaDeployments whose metadata names none (default: default)")
    rn.set_defaults(func=cmd_render)

    c = sub.add_parser("crd", help="write the CustomResourceDefinition generated from the API models")
    c.add_argument("--output", default="crds/llamadeployments.yaml")
    c.add_argument("--stdout", action="store_true")
    c.set_defaults(func=cmd_crd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {shortened(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `llama-operator plan ... | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
