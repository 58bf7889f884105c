"""Where a fine-tune's files come from in the pod: LoRA adapters and custom weights (spec.adapters, spec.weights).

An hf:// source is fetched once into the model cache by an init container running the server's own image
(engines.yaml `fetch`: vLLM's `hf download`, curl in llama.cpp's images), into a directory named after the
source, with a marker written last: a restarted pod, or another pod on the same cache claim, finds the
marker and fetches nothing. A pvc:// source is the claim mounted read-only. The engine is then given
local paths only. docs/adapters.md.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..engines import EngineRelease
from ..finetune import Source, parse_source
from ..lora import vllm_lora_settings

#: Where fetched sources live in the model cache (mounted at /models).
FETCHED_ROOT = "/models/llama-operator/sources"
#: Where pvc:// sources' claims are mounted.
CLAIMS_ROOT = "/sources"
#: Written into a fetched source's directory once everything in it has arrived.
MARKER = ".llama-operator-fetched"

# Each script takes its sources as arguments, four per source (directory, repository, revision, path in the
# repository or ''), so nothing of the spec is ever parsed by the shell. They stop at the first failure: the
# init container fails, the kubelet retries it, and the pod never starts on half a download.
_HF_SCRIPT = f"""set -eu
while [ "$#" -ge 4 ]; do
  dest=$1; repo=$2; rev=$3; path=$4; shift 4
  if [ -e "$dest/{MARKER}" ]; then echo "cached: $repo@$rev $path"; continue; fi
  mkdir -p "$dest"
  if [ -z "$path" ]; then
    hf download "$repo" --revision "$rev" --local-dir "$dest"
  else
    case "$path" in
      *.gguf|*.GGUF) hf download "$repo" "$path" --revision "$rev" --local-dir "$dest" ;;
      *) hf download "$repo" --include "$path/*" --revision "$rev" --local-dir "$dest" ;;
    esac
  fi
  touch "$dest/{MARKER}"
done
"""
_CURL_SCRIPT = f"""set -eu
endpoint=${{HF_ENDPOINT:-https://huggingface.co}}
while [ "$#" -ge 4 ]; do
  dest=$1; repo=$2; rev=$3; path=$4; shift 4
  if [ -e "$dest/{MARKER}" ]; then echo "cached: $repo@$rev $path"; continue; fi
  mkdir -p "$dest/$(dirname "$path")"
  # The token goes to curl on its standard input, never on a command line.
  if [ -n "${{HF_TOKEN:-}}" ]; then printf 'Authorization: Bearer %s\\n' "$HF_TOKEN"; fi |
    curl --fail --silent --show-error --location --retry 5 --header @- \\
      --output "$dest/$path.part" "$endpoint/$repo/resolve/$rev/$path"
  mv "$dest/$path.part" "$dest/$path"
  touch "$dest/{MARKER}"
done
"""


@dataclass(frozen=True)
class Fetch:
    """One hf:// source the init container fetches."""

    dest: str
    repo: str
    revision: str
    path: str


@dataclass(frozen=True)
class PodSources:
    """What the pod needs for the spec's sources: the fetches, the claims to mount (volume name, claim), and
    each source's local path."""

    fetches: tuple[Fetch, ...]
    claims: tuple[tuple[str, str], ...]
    local: dict[str, str]

    def fetch_command(self, rel: EngineRelease) -> list[str]:
        """The init container's command: its release's fetch script over every hf:// source."""
        script = _CURL_SCRIPT if rel.fetch_command[:1] == ("curl",) else _HF_SCRIPT
        args = [a for f in self.fetches for a in (f.dest, f.repo, f.revision, f.path)]
        return ["sh", "-c", script, "fetch-sources", *args]


def _fetched_dir(source: Source) -> str:
    """A directory per source as written (repository, revision and path): a new revision is a new directory,
    and two deployments naming the same source on one cache claim share it."""
    key = f"{source.location}@{source.revision or 'main'}/{source.path}"
    return f"{FETCHED_ROOT}/{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def pod_sources(sources: list[str]) -> PodSources:
    """The fetches, claim mounts and local paths of the given sources (hf:// or pvc://), in order."""
    fetches: list[Fetch] = []
    claims: list[tuple[str, str]] = []
    local: dict[str, str] = {}
    for text in sources:
        if text in local:
            continue
        source = parse_source(text)
        if source.scheme == "hf":
            dest = _fetched_dir(source)
            fetches.append(Fetch(dest, source.location, source.revision or "main", source.path))
            local[text] = f"{dest}/{source.path}" if source.path else dest
        else:
            if all(claim != source.location for _, claim in claims):
                claims.append((f"source-{len(claims)}", source.location))
            root = f"{CLAIMS_ROOT}/{source.location}"
            local[text] = f"{root}/{source.path}" if source.path else root
    return PodSources(tuple(fetches), tuple(claims), local)


def is_custom(weights_source: str) -> bool:
    """A plan's weightsSource names a fine-tune (hf:// or pvc://) rather than a catalog repository."""
    return weights_source.startswith(("hf://", "pvc://"))


def finetune_context(spec, plan, rel: EngineRelease, quant) -> dict:
    """What the templates add for spec.adapters and spec.weights: the init container's command (None: nothing
    to fetch), the claims to mount, the local path of custom weights (None: the catalog's), and the engine's
    arguments for in-flight quantization and the adapters (engines.yaml `inFlightQuantization`, `lora`)."""
    custom = is_custom(plan.weightsSource)
    texts = [a.source for a in spec.adapters] + ([plan.weightsSource] if custom else [])
    sources = pod_sources(texts)
    args: list[str] = []
    if custom and plan.runtime == "vllm" and quant.bits < 16:
        args += list(rel.in_flight[quant.id].args)
    if spec.adapters:
        lora = rel.lora
        assert lora is not None  # the planner plans adapters only on a release that takes them
        paths = [sources.local[a.source] for a in spec.adapters]
        if plan.runtime == "vllm":
            s = vllm_lora_settings(tuple(a.rank for a in spec.adapters), spec.slo.concurrency)
            args += [lora.flags["enable"], lora.flags["adapters"],
                     *[f"{a.name}={p}" for a, p in zip(spec.adapters, paths)],
                     lora.flags["maxLoras"], str(s.max_loras), lora.flags["maxRank"], str(s.max_lora_rank),
                     lora.flags["maxCpuLoras"], str(s.max_cpu_loras)]
        elif len(paths) == 1:  # one: applied to every request (scale 1)
            args += [lora.flags["adapters"], paths[0]]
        else:
            # Several: each loaded at scale 0, so none applies unless a request asks for it by id. Not
            # --lora-init-without-apply: llama-server runs every request without `lora` at the default scales,
            # 1 for --lora, so that flag changes nothing a request sees (engines.yaml lora.adapters.syntax).
            # A path holds no ':' or ',' (finetune.SOURCE_PATTERN), which --lora-scaled splits on.
            for p in paths:
                args += [lora.flags["scaled"], f"{p}:0"]
        if plan.runtime == "llamacpp":
            # A request without `lora` would reuse a prompt cache another adapter computed (engines.yaml
            # lora.adapters.syntax): caching off by default. TTFT is predicted without a cached prefix anyway.
            args.append(lora.flags["noPromptCache"])
    return {
        "fetch_command": sources.fetch_command(rel) if sources.fetches else None,
        "source_claims": [{"volume": v, "claim": c, "mount": f"{CLAIMS_ROOT}/{c}"} for v, c in sources.claims],
        "custom_weights_path": sources.local[plan.weightsSource] if custom else None,
        "finetune_args": args,
    }
