"""Pinned versions of what neverdark installs on hosts (one place, used by plan and wheelhouse)."""

HERMES_VERSION = "0.19.0"
LLAMA_VERSION = "0.3.36"
HERMES_REQUIREMENTS = [f"hermes-agent[anthropic,messaging]=={HERMES_VERSION}"]
LLAMA_REQUIREMENTS = [f"llama-cpp-python[server]=={LLAMA_VERSION}"]
SIDECAR_REQUIREMENTS = ["httpx", "pyyaml"]
