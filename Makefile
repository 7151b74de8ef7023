# The two first commands (see README): `make demo` and `make test`. Both set up what they need.
PYTEST_ARGS ?=

.PHONY: setup demo test
setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/python -m testbed.demo

test: setup
	.venv/bin/python -m pytest -ra --durations=25 $(PYTEST_ARGS)
