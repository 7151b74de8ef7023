"""pyinfra deployers, one per component; `deploys/fleet.py` is the entry point."""
