"""Pinned versions of what neverdark installs on hosts (one place, used by plan and wheelhouse)."""

HERMES_VERSION = "0.19.0"
LLAMA_VERSION = "0.3.36"
HERMES_REQUIREMENTS = [f"hermes-agent[anthropic,messaging]=={HERMES_VERSION}"]
LLAMA_REQUIREMENTS = [f"llama-cpp-python[server]=={LLAMA_VERSION}"]
SIDECAR_REQUIREMENTS = ["httpx", "pyyaml", "prometheus_client>=0.20"]

# The llama-cpp-python sdist the host artifacts are compiled from (neverdark.artifacts): its
# vendor/llama.cpp is llama.cpp commit 0c1e570, which also gives the native llama-server.
LLAMA_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
# The PEP 517 backend the sdist names (scikit-build-core), pinned for repeatable builds.
SCIKIT_BUILD_CORE = "scikit-build-core==1.1.2"
