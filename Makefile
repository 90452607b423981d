# facial_perception: one-command setup, demo, tests and benchmark on Debian 12 / Python 3.11 without a system ROS.
#   make demo       set up (first run: a few minutes), then run the live demo graph with real DDS
#   make test       set up, lint, run the whole test suite (what .ci/run calls)
#   make benchmark  set up, then the 30 Hz / 640x480 node benchmark (results -> docs/)
#   make clean      remove build products (keeps the venv); make distclean also removes the venv
#   variables: TESTS=test/test_x.py PYTEST_ARGS='-x -k name' DEMO_ARGS=... BENCHMARK_ARGS=... VENV=dir
# Every target re-runs scripts/setup.sh, which takes seconds when nothing changed.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

REPO := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV ?= $(REPO)/.venv
PYTHON := $(VENV)/bin/python
# the ROS environment of the venv + the sources under test first on the import path
RUN := cd $(REPO) && set +u && . $(VENV)/bin/ros_env.sh && set -u && export PYTHONPATH=$(REPO)$${PYTHONPATH:+:$$PYTHONPATH} &&

TESTS ?= test
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCHMARK_ARGS ?=

.PHONY: help setup demo test lint pytest benchmark clean distclean

help:
	@sed -n '2,7p' $(REPO)/Makefile | sed 's/^# *//'

setup:
	@FP_VENV=$(VENV) bash $(REPO)/scripts/setup.sh

demo: setup
	@$(RUN) python -m facial_perception.ros.demo $(DEMO_ARGS)

lint: setup
	@$(RUN) ruff check .
	@$(RUN) ruff format --check .

pytest: setup
	@$(RUN) python -m pytest $(TESTS) -o 'markers=slow: builds or runs long (still part of make test)' $(PYTEST_ARGS)

test: lint pytest

benchmark: setup
	@$(RUN) python -m facial_perception.ros.ros_benchmark $(BENCHMARK_ARGS)

clean:
	rm -rf $(VENV)/build $(REPO)/build $(REPO)/install $(REPO)/log $(REPO)/.pytest_cache $(REPO)/.ruff_cache
	find $(REPO) -path $(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
