# fastvit-jax: one entry point per job. Every target creates .venv/ when missing.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup demo test test-slow test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements.lock
	$(VPY) -m pip install --quiet --no-deps -e .
	# libtpu for train_tpu.py --compile_only, beside the environment (not importable: CPU/GPU runs never load it)
	test -f $(VENV)/libtpu-aot/libtpu/libtpu.so || $(VPY) -m pip install --quiet --no-deps --target $(VENV)/libtpu-aot libtpu==0.0.42.1
	touch $(STAMP)

demo: setup
	$(VPY) -m fastvit_jax.demo

test: setup
	$(VPY) -m pytest -q -n 2 --dist loadgroup --durations=15 -m "not slow" tests

# The tests marked slow: the other variants, sizes and meshes of what `make test` checks, and the
# benchmark report. CI runs both tiers (.ci/run).
test-slow: setup
	$(VPY) -m pytest -q -n 2 --dist loadgroup --durations=15 -m slow --durations-file build/test-durations-slow.txt tests

test-all: setup
	$(VPY) -m pytest -q -n 2 --dist loadgroup -m "slow or not slow" tests

bench: setup
	$(VPY) -m benchmarks.run --quick

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
