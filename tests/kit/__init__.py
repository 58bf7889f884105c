"""The test kit: the helpers the suites share, so that each exists once.

Every suite finds it the same way: pyproject.toml puts tests/ on pytest's `pythonpath`, so a test (or a
suite's own helper module) imports `kit.<module>`. A helper only one suite uses stays beside that
suite's tests, imported by its module name (pytest puts a test's folder on sys.path).

* paths: the repository's root and the files the tests read (examples, CRDs).
* examples: the LlamaDeployments of examples/ and the Nodes of examples/clusters/.
* nodes: a Node manifest as `kubectl get node -o yaml` shows it, labelled as the GPU operators do.
* poll: bounded waits (`wait_until`, `holds_for`): no test waits blindly or forever.
* cluster: a cluster as the tests drive it, through a kubeconfig (the emulator's or a real one).
* operator: the operator in a thread of its own, with settings for tests.
* crd: what the API server does to a custom resource before admitting it (defaults, CEL, patterns).
* pod_security: the Pod Security Standard "restricted" checks, one message per broken rule.
* tools: the external tools the tests drive (helm, promtool, kubectl...), found or skipped.
* http_stub: stub HTTP servers on 127.0.0.1 answering with a function of the request (fake engines'
  /metrics, a fake Prometheus API), and free ports.
* prometheus: a real Prometheus server on 127.0.0.1 for one test, started from a config dict, stopped after.
"""
