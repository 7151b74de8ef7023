"""neverdark's test bench: the nspawn test fleet, cloud and Telegram stand-ins, the demo.

Not part of the product: `pip install .` does not install it. Tests, the demo and the benchmarks
import it from a checkout of the repository (pytest's `pythonpath`, or the repo root as cwd).
"""
