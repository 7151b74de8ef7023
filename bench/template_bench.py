"""What each chat template makes of what Hermes really sends to a local backend.

    .venv/bin/python bench/template_bench.py [--show FAMILY/VARIANT]

Real parts on the runner (testbed.template_serving): the real Hermes gateway configured as the
deploy configures a wizard, whose three local variants (lean without tools, lean with the
memory and todo toolsets, full with Hermes' defaults) each send one turn to an LLMock; then
native llama-server, with the unit's command line, on each template copy of the test model
(testbed.template_models) and on the test model itself (no template: chatml, --no-jinja)
renders each request (POST /apply-template) and counts its tokens (POST /tokenize). Prints
characters and tokens per template and variant; --show prints one rendering. docs/templates.md
has the figures. Nothing is asserted (tests/test_templates_served.py asserts).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed import template_serving as ts  # noqa: E402

FAMILIES = ("gemma3-it", "qwen2.5-instruct", None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--show", help="print one rendering, e.g. gemma3-it/local or chatml/local")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="template-bench-") as tmp:
        root = Path(tmp)
        bodies = ts.hermes_bodies(root / "hermes")
        print(f"{'template':<18}{'variant':<8}{'tools':>6}{'chars':>8}{'tokens':>8}")
        for family in FAMILIES:
            label = family or "chatml"
            server = ts.serve("llama-server", family, root / "logs")
            try:
                for variant, body in bodies.items():
                    if family is None and body.get("tools"):
                        print(f"{label:<18}{variant:<8}{len(body['tools']):>6}  refused "
                              "(--no-jinja: tools param requires --jinja flag)")
                        continue
                    prompt = ts.rendered(server, body)
                    print(f"{label:<18}{variant:<8}{len(body.get('tools') or []):>6}"
                          f"{len(prompt):>8}{ts.token_count(server, prompt):>8}")
                    if args.show == f"{label}/{variant}":
                        print(prompt)
            finally:
                server.stop()


if __name__ == "__main__":
    main()
