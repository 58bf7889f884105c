"""What the reliability suite tries, as data: the tests run these cases and docs/reliability.md lists
them (reliability_doc.py renders a row per case from what the test recorded).

Every outcome a test records is one of the fixed sentences below when all its checks passed, or
"FAILED: ..." otherwise, so the committed doc is deterministic (no timings) and a green run reproduces
it byte for byte.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

BAD_INPUTS = Path(__file__).resolve().parent / "bad_inputs"

# --- API faults: every write the operator makes, under each kind of failure -----------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    label: str  # what the doc calls the request
    action: str  # kmock action: create | update (PATCH)
    plural: str
    subresource: str | None = None


TARGETS = [
    Target("create Deployment", "create", "deployments"),
    Target("patch Deployment", "update", "deployments"),
    Target("create Service", "create", "services"),
    Target("patch Service", "update", "services"),
    Target("create PersistentVolumeClaim", "create", "persistentvolumeclaims"),
    Target("patch LlamaDeployment status", "update", "llamadeployments", "status"),
    Target("create Event", "create", "events"),
]


@dataclasses.dataclass(frozen=True)
class FaultKind:
    id: str
    label: str
    status: int
    mode_create: str  # before | after (see reliability_harness.Fault)
    mode_patch: str
    retry_after: int | None = None
    times: int = 2


FAULT_KINDS = [
    FaultKind("500-lost", "500, answer lost (the write was applied)", 500, "after", "after"),
    FaultKind("500-refused", "500, refused (nothing applied)", 500, "before", "before"),
    FaultKind("429", "429 Too Many Requests, Retry-After: 1", 429, "before", "before", retry_after=1),
    # A real 409 on create means the object exists (here: stored, then answered AlreadyExists); on a patch
    # it means another writer changed the object in between and the patch was not applied.
    FaultKind("409", "409 (AlreadyExists on create; Conflict on patch: another writer got in first)", 409,
              "after", "before"),
]


@dataclasses.dataclass(frozen=True)
class FaultCase:
    kind: FaultKind
    target: Target

    @property
    def id(self) -> str:
        return f"{self.kind.id}:{self.target.label}"

    def fault_kwargs(self) -> dict[str, Any]:
        return dict(action=self.target.action, plural=self.target.plural, subresource=self.target.subresource,
                    status=self.kind.status, retry_after=self.kind.retry_after, times=self.kind.times,
                    mode=self.kind.mode_create if self.target.action == "create" else self.kind.mode_patch)


FAULT_CASES = [FaultCase(k, t) for k in FAULT_KINDS for t in TARGETS]
CONVERGED = "converged to the fault-free result; no duplicates, nothing left after delete"


# --- watches ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WatchCase:
    id: str
    label: str
    plural: str
    fault: dict[str, Any]


WATCH_CASES = [
    WatchCase(f"{kind}:{plural}", label, plural, fault)
    for plural in ("llamadeployments", "deployments", "pods")
    for kind, label, fault in (
        ("end", "the watch ends at once, 3 times in a row", dict(kind="end", times=3)),
        ("gone", "410 Gone in the watch stream", dict(kind="gone", times=1)),
        ("500", "500 on the watch request, twice", dict(kind="status", status=500, times=2)),
    )
]

# --- outage, restarts, peering, secrets -----------------------------------------------------------------

SCENARIOS = {
    "outage": ("The API server unreachable for 30 s (its port closed, then reopened on the same port) while "
               "a LlamaDeployment is created, one is updated and one is deleted",
               "converged after the outage: created, updated and deleted as asked; no duplicates, no orphans"),
    "kill-mid-reconcile": ("The operator SIGKILLed while its Service create hangs (the Deployment is already "
                           "created), then a new operator started",
                           "the new operator converged to the fault-free result; one Deployment, no duplicates"),
    "stop-mid-reconcile": ("The operator stopped while its status patch hangs (Deployment, Service and claim "
                           "written), then a new operator started",
                           "the new operator converged to the fault-free result; no duplicate Events"),
    "peering": ("Two operator replicas with peering (different priorities); after the first stops, a third "
                "of the highest priority joins",
                "only the highest-priority live replica wrote anything; after it stopped, the other took over; "
                "paused by the newcomer, it ran no pass, its resync timers included"),
    "bad-inputs-quiet": ("All bad inputs created at once beside a valid LlamaDeployment",
                         "the valid one converged; no crash; no status write or Event in 3 s of quiet"),
}

# --- objects of the same name, hand edits, refusals --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuardCase:
    key: str
    kind: str  # the doc's first column: what sort of case
    what: str  # what the test does
    outcome: str  # the green outcome


_CONFLICT = ("left unchanged (also after the LlamaDeployment is deleted); Degraded, Ready False OwnershipConflict "
             "naming it and the fix; 1 Warning Event")
_REFUSED = ("Invalid with the API server's message; 1 Warning ObjectRefused Event; not sent again on wakes, no "
            "traceback; converged once admitted")
_NAME = "Invalid, message names metadata.name; 1 Warning InvalidSpec Event; nothing created"
_RESTORED = "written back at once; 1 Warning DriftCorrected Event; Ready again"

GUARD_CASES = [
    GuardCase("conflict-service", "Object of the same name",
              "A Service named like the LlamaDeployment exists (another app's, no owner)",
              _CONFLICT + "; converged once it was removed"),
    GuardCase("conflict-service-labelled", "Object of the same name",
              "The same, carrying the operator's labels but no owner reference", _CONFLICT),
    GuardCase("conflict-deployment", "Object of the same name",
              "A Deployment named like the LlamaDeployment exists (another app's)", _CONFLICT),
    GuardCase("conflict-claim", "Object of the same name",
              "A claim NAME-model-cache exists (another app's) and spec.source.cache.size asks for one",
              "not mounted (no Deployment until it is gone) and " + _CONFLICT + "; converged once it was removed"),
    GuardCase("existing-claim", "Object of the same name",
              "spec.source.cache.existingClaim names another app's claim", "mounted as asked, left unchanged; Ready"),
    GuardCase("edit-image", "Hand edit", "The owned Deployment's image changed through the API", _RESTORED),
    GuardCase("edit-privileged", "Hand edit", "A privileged securityContext added to its container", _RESTORED),
    GuardCase("edit-hostpath", "Hand edit", "A hostPath volume of / added to it and mounted", _RESTORED),
    GuardCase("edit-replicas", "Hand edit", "Its replicas set to 3", _RESTORED),
    GuardCase("edit-service", "Hand edit", "The owned Service's selector and port changed", _RESTORED),
    GuardCase("resync-quiet", "Hand edit",
              "Nothing changed, through 3 resyncs (the emulator defaults fields and writes quantities in canonical "
              "form, as a real server)", "no write"),
    GuardCase("refused-admission", "Refused",
              "An admission policy refuses the Deployment (400, as a validating webhook)", _REFUSED),
    GuardCase("refused-quota", "Refused", "A storage quota refuses the model-cache claim (403 exceeded quota)",
              _REFUSED.replace("; converged", "; no Deployment mounting the missing claim; converged")),
    GuardCase("name-long", "Refused", "A LlamaDeployment name of 64 characters (a Service name has at most 63)",
              _NAME),
    GuardCase("name-dot", "Refused", "A name with a dot, my.chat (not a Service name)", _NAME),
    GuardCase("name-digit", "Refused", "A name starting with a digit, 1chat (not a Service name)", _NAME),
    GuardCase("pods-refused", "Refused",
              "The namespace enforces Pod Security restricted, and the pods run as root (Llama 3.2 11B Vision on "
              "vLLM 0.10.2, an image with no other user): the Deployment reports ReplicaFailure (FailedCreate)",
              "Degraded with the admission error in message and conditions; 1 Warning ReplicaFailure Event"),
]

SECRETS = {
    "logs": "every log record of the operator process (DEBUG, all loggers)",
    "status": "the LlamaDeployment's status",
    "events": "every Event",
    "objects": "every object in the emulator except the Secret itself",
}
SECRET_ABSENT = "the token does not appear"


# --- bad inputs ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BadInput:
    path: Path
    wrong: str
    caught_by: str  # schema | cel | operator | unschedulable
    field: str  # the field at fault; an Invalid status message and Event name it
    doc: dict
    says: str | None = None  # for unschedulable inputs: what the status message must say

    @property
    def name(self) -> str:
        return self.doc["metadata"]["name"]

    @property
    def key(self) -> str:
        return self.path.stem

    @property
    def expected_phase(self) -> str:
        return "Unschedulable" if self.caught_by == "unschedulable" else "Invalid"


def bad_inputs() -> list[BadInput]:
    out = []
    for path in sorted(BAD_INPUTS.glob("*.yaml")):
        text = path.read_text()
        head = dict(line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("# ") and ": " in line)
        out.append(BadInput(path, head["wrong"], head["caught-by"], head["field"], yaml.safe_load(text),
                            head.get("says")))
    return out


CAUGHT_BY = {
    "schema": "CRD schema",
    "cel": "CRD CEL rule",
    "operator": "operator",
    "unschedulable": "operator (planner)",
}


def bad_input_answer(b: BadInput) -> str:
    """The green outcome of a bad input in the emulator (which admits anything)."""
    if b.caught_by == "unschedulable":
        return "Unschedulable with reasons; 1 Warning Unschedulable Event"
    return f"Invalid, message names {b.field}; 1 Warning InvalidSpec Event"


# --- plan / render input files ------------------------------------------------------------------------
# `llama-operator plan` and `render` read YAML files a person hands them: what they do with hostile or
# huge ones (test_bad_inputs.py runs each as its own process, both commands where they apply).

CLI_INPUTS = {
    "alias-bomb": ("A YAML alias bomb (\"billion laughs\": 9 levels of 9 aliases, 9^9 strings from a file of 611 bytes), "
                   "as the LlamaDeployment file and as the cluster file",
                   "exit 1 within 10 s and 200 MiB; a one-line message (under 500 characters) naming the file"),
    "odd-yaml": ("A recursive alias, YAML nested 150 levels deep, an integer of 5,000 digits, a !!set, a tag of "
                 "100,000 characters, a file that is not UTF-8",
                 "exit 1 for each, a message of at most 1,000 characters"),
    "huge-numbers": ("memoryBudget of 400 nines with E, of 99999999999E (beyond int64) and of a 400-digit integer; "
                     "contextLength 10^400; replicas 1e400",
                     "exit 1, the message names the field"),
    "megabyte-strings": ("Strings of 1 MiB as metadata.name, memoryBudget, a toleration's key and value and a "
                         "nodeSelector key and value",
                         "exit 1, the message names each field, in under 5,000 characters"),
    "bad-names": ("metadata.name my.chat, Chat, and one of 64 characters", "exit 1, the message names metadata.name"),
    "oversized-files": ("A LlamaDeployment file over 16 MiB, a cluster file over 512 MiB",
                        "exit 1 naming the limit, before reading the file"),
    "malformed-nodes": ("Nodes whose labels are a list, whose allocatable cpu is \"lots\", whose conditions are a "
                        "number", "exit 1 naming the Node"),
    "large-cluster": ("A cluster file of 10,000 Nodes (a `kubectl get nodes -o yaml` List, 7 MB), as YAML and as "
                      "JSON", "planned (exit 0); benchmarks/bench_cli_load.py times it"),
}
