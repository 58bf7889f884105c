"""The Hugging Face token never leaves its Secret: not into logs, status, Events or any object the
operator renders. The operator only references the Secret by name (secretKeyRef); this proves it,
with every log record of the process captured at DEBUG while a LlamaDeployment that references the
Secret is created, updated, made invalid and deleted.
"""
from __future__ import annotations

import base64
import json

from kit.poll import wait_until
from reliability_cases import SECRET_ABSENT, SECRETS
from reliability_harness import UPDATE, chat_doc, delete_and_wait_gone

TOKEN = "hf_RELIABILITYtestTOKEN0123456789abcdefXYZ"


def test_the_token_appears_nowhere(cluster, operator_logs, results):
    ns = "secret"
    forms = [TOKEN, base64.b64encode(TOKEN.encode()).decode()]
    secrets = cluster.api.resources.get(api_version="v1", kind="Secret")
    secrets.create(namespace=ns, body={"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                       "metadata": {"name": "hf-token"},
                                       "data": {"HF_TOKEN": forms[1]}})
    cluster.operator()
    doc = chat_doc()
    assert doc["spec"]["source"]["hfTokenSecretRef"]["name"] == "hf-token"
    cluster.create(doc, ns)
    cluster.wait_converged(ns, ["chat"])
    cluster.patch_spec("chat", UPDATE, ns)
    cluster.wait_converged(ns, ["chat"])

    # The Deployment does use the Secret: by reference.
    (deployment,) = cluster.list("apps/v1", "Deployment", ns)
    refs = [e["valueFrom"]["secretKeyRef"] for c in deployment["spec"]["template"]["spec"]["containers"]
            for e in c.get("env") or [] if (e.get("valueFrom") or {}).get("secretKeyRef")]
    assert refs == [{"name": "hf-token", "key": "HF_TOKEN"}], refs

    cluster.patch_spec("chat", {"replicas": 0}, ns)  # invalid: the operator writes an Invalid status
    cluster.wait_phase("chat", "Invalid", 30, namespace=ns, generation=True)
    status = cluster.status("chat", ns)
    wait_until(lambda: any(e["reason"] == "InvalidSpec" for e in cluster.events(namespace=ns)), 10,
               "the InvalidSpec Event", retry_errors=True)
    events = cluster.events(namespace=ns)
    everything = [o for o in cluster.server.live_objects()
                  if not (o.get("kind") == "Secret" and o["metadata"].get("name") == "hf-token")]
    assert not delete_and_wait_gone(cluster, ns)
    logs = operator_logs.text()

    # The capture did see the operator at work on this object (kopf's per-object log, DEBUG included).
    assert sum(1 for r in operator_logs.records if r.name == "kopf.objects") > 10, "the log capture saw nothing"
    assert len(events) >= 4 and len(everything) > 20
    places = {
        "logs": logs,
        "status": json.dumps(status),
        "events": json.dumps(events),
        "objects": json.dumps(everything),
    }
    assert set(places) == set(SECRETS)
    leaks = [where for where, text in places.items() if any(f in text for f in forms)]
    for where in SECRETS:
        results.add("secrets", where, where=SECRETS[where],
                    outcome=SECRET_ABSENT if where not in leaks else "FAILED: the token is there")
    assert not leaks, f"the token leaked into: {leaks}"
