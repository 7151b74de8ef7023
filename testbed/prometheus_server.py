"""A real Prometheus (Debian's `prometheus` package, which scripts/setup.sh installs) on the
runner, for the tests that check the sidecar's metrics and the alert rules end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

from testbed.llmock import free_port


def binary() -> str:
    found = shutil.which("prometheus")
    assert found, "prometheus not found: `apt-get install prometheus` (scripts/setup.sh does)"
    return found


def start(config: Path, work: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Prometheus with `config`, its database and log under `work`, on loopback `port` (else a
    free one): the process and its base URL (it may take a moment to answer)."""
    port = port or free_port()
    with (work / "prometheus.log").open("w") as log:
        proc = subprocess.Popen([binary(), f"--config.file={config}",
                                 f"--storage.tsdb.path={work / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=log)
    return proc, f"http://127.0.0.1:{port}"


def api(base: str, path: str, **params) -> dict:
    """GET Prometheus' HTTP API `/api/v1/<path>`: its `data`, after checking `status`."""
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        doc = json.loads(r.read())
    assert doc["status"] == "success", doc
    return doc["data"]
