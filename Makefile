# The two commands of the README's quick start. Each does its own set-up (scripts/setup.sh).
.PHONY: sandbox test crd docs bench

PY := .venv/bin/python

sandbox:
	@scripts/setup.sh sandbox
	@$(PY) -m llama_operator.cli sandbox

test:
	@scripts/setup.sh test
	@PATH="$(CURDIR)/.tools/bin:$(CURDIR)/.venv/bin:$$PATH" $(PY) -m pytest

crd:
	@$(PY) -m llama_operator.cli crd

docs:
	@$(PY) scripts/update_docs.py

bench:
	@$(PY) benchmarks/bench_planner.py
