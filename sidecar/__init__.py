"""neverdark sidecar: per-host failover daemon (python -m sidecar). Stdlib + httpx + pyyaml only."""
