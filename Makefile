# The two first commands (see README): `make demo` and `make test`. Both set up what they need.
PYTEST_ARGS ?=

.PHONY: setup demo test
setup:
	./scripts/setup.sh

# The demo's setup stops at .venv: the demo itself says what its fleet needs and builds only
# that (the engine its hosts run, per arch), beside the host images and the model download.
demo:
	./scripts/setup.sh --demo
	.venv/bin/python -m testbed.demo

test: setup
	.venv/bin/python -m pytest -ra --durations=25 $(PYTEST_ARGS)
