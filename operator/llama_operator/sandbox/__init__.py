"""The sandbox wing: an emulated cluster for `llama-operator sandbox`, the tests and the benchmarks.

Nothing in the operator's core imports it; only cli.py's `sandbox` command does. It needs kmock, the
optional extra (``pip install llama-operator[sandbox]``).

* ``emulator.py``: ``ClusterEmulator``, an in-memory API server built on kmock (its writes);
  ``reads.py`` its lists and watches, ``admission.py`` what it refuses and fills in on a write;
* ``server.py``: the emulator served on a port of 127.0.0.1 (``serve_emulator``, ``EmulatorThread``),
  and a kubeconfig for it;
* ``kubelet.py``: ``SimulatedKubelet``, a stand-in for the scheduler and kubelet;
* ``engines.py``: ``SimulatedEngines``, the model servers' Prometheus ``/metrics`` in each engine's own format
  on a loopback address per pod, with the latency and load the sandbox annotations ask for (the SLO loop's);
* ``demo.py``: ``run_sandbox``, the operator against all of the above, with the bundled examples.
"""
