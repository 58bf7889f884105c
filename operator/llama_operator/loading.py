"""Reading what `plan`, `render` and `sandbox` are given: LlamaDeployment files, cluster files (Nodes and
Pods), or the live cluster of the current kubeconfig.

A file comes from anyone: it is read within bounds (its size, its nesting, what its aliases reach), and
whatever is wrong with it is a UserError, one message of bounded length naming the file and the problem,
never a traceback.
"""
from __future__ import annotations

import gc
import io
import json
from pathlib import Path
from typing import Any

import yaml

from . import api
from .api import SpecError
from .units import shown


class UserError(Exception):
    """Bad input from the person at the keyboard: printed as one clear message, exit 1."""


#: The largest files `plan` and `render` read: LlamaDeployments are a few hundred bytes each; a cluster
#: file is `kubectl get nodes -o yaml` (with pods), some KiB per node (images lists included).
MAX_DEPLOYMENT_FILE_BYTES = 16 * 2**20
MAX_CLUSTER_FILE_BYTES = 512 * 2**20
#: Nodes a file may reach again through YAML aliases (a "billion laughs" file reaches billions from a few
#: hundred bytes; hand-written manifests that share an anchor reach a few hundred).
MAX_ALIASED_NODES = 100_000
#: Nesting deeper than any Kubernetes object (libyaml stops at 1000 levels).
MAX_YAML_DEPTH = 100
#: The longest error message printed (a message quoting the input is cut): room for api.MAX_PROBLEMS
#: problems; a YAML error says one thing, in at most MAX_YAML_ERROR_CHARS.
MAX_ERROR_CHARS = 10_000
MAX_YAML_ERROR_CHARS = 1000

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where PyYAML was built with it
_STR, _SEQ, _MAP = "tag:yaml.org,2002:str", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"
_MERGE = "tag:yaml.org,2002:merge"


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """The safe loader (libyaml's parser) resolving the tag of each distinct plain scalar once: a cluster file
    repeats the same few thousand label keys, values and quantities a million times."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._plain_tags: dict[str, str] = {}

    def resolve(self, kind, value, implicit):
        if kind is yaml.ScalarNode and implicit[0]:  # a plain scalar: its tag depends on its text alone
            tag = self._plain_tags.get(value)
            if tag is None:
                tag = self._plain_tags[value] = super().resolve(kind, value, implicit)
            return tag
        return super().resolve(kind, value, implicit)


class _Refused(Exception):
    """A YAML document the loader will not build (too deep, too much aliasing, an unsupported tag)."""


_BUSY = object()  # an anchor whose node is still being read
_NO_KEY = object()  # a mapping waiting for its next key
_MERGE_KEY = object()  # the key <<


class _Frame:
    __slots__ = ("obj", "is_map", "anchor", "start", "key", "key_line", "merged")

    def __init__(self, obj, is_map: bool, anchor: str | None, start: int) -> None:
        self.obj, self.is_map, self.anchor, self.start = obj, is_map, anchor, start
        self.key: Any = _NO_KEY
        self.key_line = 0
        self.merged: list[dict] | None = None


def _build_documents(loader) -> list[Any]:
    """The documents of a YAML stream, built straight from the parser's events: the objects the safe loader
    builds (str, int, float, bool, None, timestamps, binary, lists, dicts, merge keys), without composing
    the whole tree of nodes first (a 10,000-node List is one document of a million nodes: `plan` peaked
    at 537 MiB that way, 149 MiB this way).

    What aliases reach is counted: a node reached again through an alias counts again, so an alias bomb is
    refused after MAX_ALIASED_NODES nodes instead of being expanded later (by validation, by an error
    message); an alias is the same object, as with the safe loader. Nesting deeper than MAX_YAML_DEPTH, a
    recursive alias, and tags other than the plain ones (!!set, !!omap, custom tags) are refused."""
    get, resolve, constructors = loader.get_event, loader.resolve, loader.yaml_constructors
    undefined = constructors[None]
    docs: list[Any] = []
    visits = aliased = 0  # nodes read, an alias counting its node's size again; of which through aliases
    get()  # StreamStart
    while not loader.check_event(yaml.StreamEndEvent):
        get()  # DocumentStart
        anchors: dict[str, Any] = {}  # anchor -> (object, nodes in it) or _BUSY
        stack: list[_Frame] = []
        doc = None
        while True:
            ev = get()
            cls = ev.__class__
            if cls is yaml.ScalarEvent:
                visits += 1
                tag = ev.tag
                if tag is None or tag == "!":
                    tag = resolve(yaml.ScalarNode, ev.value, ev.implicit)
                if tag == _STR:
                    value = ev.value
                elif tag == _MERGE:
                    value = _MERGE_KEY
                else:
                    value = constructors.get(tag, undefined)(
                        loader, yaml.ScalarNode(tag, ev.value, ev.start_mark, ev.end_mark, ev.style))
                if ev.anchor is not None:
                    anchors[ev.anchor] = (value, 1)
            elif cls is yaml.MappingStartEvent or cls is yaml.SequenceStartEvent:
                visits += 1
                is_map = cls is yaml.MappingStartEvent
                if ev.tag not in (None, "!", _MAP if is_map else _SEQ):
                    raise _Refused(f"the tag {shown(ev.tag)} is not supported (line {ev.start_mark.line + 1})")
                if len(stack) >= MAX_YAML_DEPTH:
                    raise _Refused(f"nested deeper than {MAX_YAML_DEPTH} levels (line {ev.start_mark.line + 1})")
                if ev.anchor is not None:
                    anchors[ev.anchor] = _BUSY
                stack.append(_Frame({} if is_map else [], is_map, ev.anchor, visits))
                continue
            elif cls is yaml.MappingEndEvent or cls is yaml.SequenceEndEvent:
                frame = stack.pop()
                value = frame.obj
                if frame.merged:  # <<: *a or <<: [*a, *b]: the explicit keys win, then the first merged
                    value = {}
                    for m in reversed(frame.merged):
                        value.update(m)
                    value.update(frame.obj)
                if frame.anchor is not None:
                    anchors[frame.anchor] = (value, visits - frame.start + 1)
            elif cls is yaml.AliasEvent:
                hit = anchors.get(ev.anchor)
                if hit is None:
                    raise _Refused(f"the alias *{shown(ev.anchor)} has no anchor before it "
                                   f"(line {ev.start_mark.line + 1})")
                if hit is _BUSY:
                    raise _Refused(f"the alias *{shown(ev.anchor)} is inside its own anchor (a recursive "
                                   f"alias, line {ev.start_mark.line + 1})")
                value, size = hit
                visits += size
                aliased += size
                if aliased > MAX_ALIASED_NODES:
                    raise _Refused(f"aliases (*name) reach more than {MAX_ALIASED_NODES} nodes again; a manifest "
                                   "never needs that many (is it an alias bomb?)")
            elif cls is yaml.DocumentEndEvent:
                break
            else:  # pragma: no cover - the parser's grammar allows nothing else here
                raise _Refused(f"unexpected {cls.__name__}")
            # The value goes into the mapping or list being read, or is the document.
            if not stack:
                if value is _MERGE_KEY:
                    raise _Refused(f"<< is a merge key, not a value; quote it (line {ev.start_mark.line + 1})")
                doc = value
                continue
            frame = stack[-1]
            if frame.is_map and frame.key is _NO_KEY:
                frame.key, frame.key_line = value, ev.start_mark.line
                continue
            if value is _MERGE_KEY:
                raise _Refused(f"<< is a merge key, not a value; quote it (line {ev.start_mark.line + 1})")
            if not frame.is_map:
                frame.obj.append(value)
                continue
            key, frame.key = frame.key, _NO_KEY
            if key is _MERGE_KEY:
                merged = value if isinstance(value, list) else [value]
                if not all(isinstance(m, dict) for m in merged):
                    raise _Refused(f"a merge key (<<) takes mappings (line {frame.key_line + 1})")
                frame.merged = (frame.merged or []) + merged
                continue
            try:
                frame.obj[key] = value
            except TypeError:  # an unhashable key: a list or a mapping
                raise _Refused(f"a mapping key is a list or a mapping (line {frame.key_line + 1})") from None
        docs.append(doc)
    get()  # StreamEnd
    return docs


def shortened(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text`, cut to at most `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    tail = f"... ({len(text)} characters in all)"
    return text[:limit - len(tail)] + tail


def _read(path: str, limit: int, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    try:
        size = p.stat().st_size
        if size > limit:
            raise UserError(f"{path}: {size} bytes, more than the {limit} bytes a {what} may have")
        with p.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(data) > limit:  # it grew while we looked
        raise UserError(f"{path}: more than the {limit} bytes a {what} may have")
    return data


def _load_documents(path: str, limit: int = MAX_DEPLOYMENT_FILE_BYTES, what: str = "file") -> list[Any]:
    """The YAML documents of a file (a List's items in its place), read with libyaml, within bounds: the
    file's size, nesting, and what aliases reach; any failure is a UserError of bounded length."""
    data = _read(path, limit, what)
    # The cyclic garbage collector would walk the growing objects again and again (a 10,000-node List is one
    # document of a million values: 3x slower with it); loading makes no cycles (a recursive alias is
    # refused), so reference counting frees whatever is dropped.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _items(_parse_documents(path, data))
    finally:
        if collecting:
            gc.enable()


def _parse_documents(path: str, data: bytes) -> list[Any]:
    if data.lstrip()[:1] in (b"{", b"["):  # `kubectl get -o json`: JSON is YAML, and json reads it 10x faster
        try:
            return [json.loads(data)]
        except (ValueError, RecursionError):  # not JSON after all (or too deep): read as YAML
            pass
    stream = io.BytesIO(data)
    stream.name = path  # for the line and column of a YAML error
    loader = _Loader(stream)
    try:
        return _build_documents(loader)
    except yaml.YAMLError as e:
        raise UserError(shortened(f"{path}: not valid YAML: {e}", MAX_YAML_ERROR_CHARS)) from None
    except _Refused as e:
        raise UserError(shortened(f"{path}: not read: {e}", MAX_YAML_ERROR_CHARS)) from None
    except (ValueError, RecursionError, MemoryError) as e:  # e.g. an integer of more than 4300 digits
        raise UserError(shortened(f"{path}: not valid YAML: {type(e).__name__}: {e}", MAX_YAML_ERROR_CHARS)) from None
    finally:
        loader.dispose()


def _items(docs: list[Any]) -> list[Any]:
    """The documents, each List replaced by its items."""
    out = []
    for d in docs:
        kind = d.get("kind") if isinstance(d, dict) else None
        if isinstance(kind, str) and kind.endswith("List") and isinstance(d.get("items"), list):
            out.extend(d["items"])
        elif d is not None:
            out.append(d)
    return out


def load_deployments(path: str) -> list[tuple[str, api.LlamaDeploymentSpec]]:
    """(name, spec) of every LlamaDeployment in the file; other kinds are ignored."""
    return [(name, spec) for name, _, spec in load_deployment_objects(path)]


def load_deployment_objects(path: str) -> list[tuple[str, dict, api.LlamaDeploymentSpec]]:
    """(name, metadata, spec) of every LlamaDeployment in the file; other kinds are ignored."""
    found = []
    for i, doc in enumerate(_load_documents(path, MAX_DEPLOYMENT_FILE_BYTES, "LlamaDeployment file")):
        if not isinstance(doc, dict) or doc.get("kind") != api.KIND:
            continue
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        name = meta.get("name") or f"document {i + 1}"
        try:
            found.append((name, meta, api.parse_object(doc)))
        except SpecError as e:
            label = name if isinstance(name, str) and len(name) <= 100 else shown(name)
            raise UserError(shortened(f"{path}: LlamaDeployment {label}:\n  " + "\n  ".join(e.problems))) from None
    if not found:
        raise UserError(f"{path}: no LlamaDeployment in the file (expected kind {api.KIND}, apiVersion {api.API_VERSION})")
    return found


def load_cluster_file(path: str):
    from .inventory import Inventory, has_leaderworkerset_crd, node_from_manifest, pod_usage

    docs = _load_documents(path, MAX_CLUSTER_FILE_BYTES, "cluster file")
    nodes = [d for d in docs if isinstance(d, dict) and d.get("kind", "Node") == "Node" and "metadata" in d]
    pods = [d for d in docs if isinstance(d, dict) and d.get("kind") == "Pod"]
    if not nodes:
        raise UserError(f"{path}: no Node in the file (a `kubectl get nodes -o yaml` dump works)")

    def read(kind: str, doc: dict, parse):
        try:
            return parse(doc)
        except Exception as e:  # noqa: BLE001 - a malformed manifest, whatever it trips on
            meta = doc.get("metadata")
            name = meta.get("name") if isinstance(meta, dict) else None
            raise UserError(shortened(f"{path}: {kind} {shown(name)} cannot be read: {type(e).__name__}: "
                                   f"{shortened(str(e), 200)}")) from None

    parsed = [read("Node", d, node_from_manifest) for d in nodes]
    usage = [u for u in (read("Pod", d, pod_usage) for d in pods) if u is not None]
    try:
        return Inventory(parsed, usage, leaderworkerset=has_leaderworkerset_crd(docs)), len(nodes)
    except Exception as e:  # noqa: BLE001
        raise UserError(shortened(f"{path}: the Nodes and Pods cannot be read: {type(e).__name__}: {e}")) from None


def load_live_cluster():
    """Nodes and Pods of the current kubeconfig's cluster."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    from .inventory import Inventory

    try:
        config.load_kube_config()
    except (ConfigException, FileNotFoundError, TypeError) as e:
        raise UserError(f"no --cluster file given and no usable kubeconfig ({e}); pass --cluster FILE or set "
                        "KUBECONFIG") from None
    core = client.CoreV1Api()
    try:
        nodes = core.list_node(_request_timeout=30).to_dict()["items"]
        pods = core.list_pod_for_all_namespaces(field_selector="status.phase!=Succeeded,status.phase!=Failed",
                                                _request_timeout=30).to_dict()["items"]
    except Exception as e:  # noqa: BLE001 - any API failure is reported the same way
        raise UserError(f"could not read Nodes and Pods from the cluster: {e}") from None
    nodes = [_camel_keys(n) for n in nodes]
    pods = [_camel_keys(p) for p in pods]
    return Inventory.from_manifests(nodes, pods), len(nodes)


def _camel_keys(obj):
    """The Python client's to_dict() uses snake_case; manifests use camelCase. Labels stay as they are."""
    if isinstance(obj, list):
        return [_camel_keys(x) for x in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        parts = k.split("_")
        key = parts[0] + "".join(p.title() for p in parts[1:]) if "_" in k and "/" not in k and "." not in k else k
        out[key] = v if key in ("labels", "annotations", "allocatable", "capacity", "limits", "requests") else _camel_keys(v)
    return out
