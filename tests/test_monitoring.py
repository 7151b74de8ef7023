"""The alert rules and the dashboard in monitoring/, checked by Prometheus' own promtool, and
held to the metric families the sidecar really exports (monitoring/metrics.txt, the one list).

promtool comes from Debian's `prometheus` package (scripts/setup.sh installs it); without it
these tests fail, saying so, rather than skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from testbed.sidecar_outputs import sidecar_outputs

REPO = Path(__file__).resolve().parent.parent
MON = REPO / "monitoring"
ALERTS = MON / "alerts.yml"
DASHBOARD = MON / "grafana-dashboard.json"

# The families a later phase adds to the sidecar. Each is an expected failure until then
# (strict: the day the sidecar exports one, its test XPASSes and fails until it leaves this
# list), so none can stay missing silently, and the rules and dashboard already use them.
PENDING: dict[str, str] = {
}
PROMETHEUS_OWN = {"up"}     # written by Prometheus for every target


def listed() -> dict[str, tuple[str, frozenset[str]]]:
    """metrics.txt: family -> (type, label names)."""
    out = {}
    for line in (MON / "metrics.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, kind, *labels = line.split()
        assert name not in out, f"{name} listed twice"
        out[name] = (kind, frozenset(labels[0].split(",")) if labels else frozenset())
    return out


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, ("promtool not found: `apt-get install prometheus` (Debian's package ships "
                  "/usr/bin/promtool; scripts/setup.sh installs it)")
    return path


def run_promtool(*args: str, cwd: Path = MON) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


# --- PromQL: which metric names an expression reads -------------------------------------------

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "bool", "offset", "inf", "nan", "atan2", "start", "end"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_DURATION = r"(?:\d+(?:ms|[smhdwy]))+"
_NUMBER = r"\d[\d.]*(?:[eE][+-]?\d+)?"
_TOKEN = re.compile(_DURATION + "|" + _NUMBER + r"|[A-Za-z_:][A-Za-z0-9_:]*|\[[^\]]*\]|\{[^}]*\}|\(|\)|[^\sA-Za-z_:({\[]+")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions (followed by
    '('), keywords, label lists after by/without/on/ignoring/group_*, or inside {} and []."""
    tokens = _TOKEN.findall(_STRING.sub('""', expr))
    names, i = set(), 0
    while i < len(tokens):
        t = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if t.lower() in ("by", "without", "on", "ignoring", "group_left", "group_right") \
                and nxt == "(":
            i = tokens.index(")", i)      # a label list
        elif re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", t) and nxt != "(" \
                and nxt.lower() not in ("by", "without") and t.lower() not in KEYWORDS:
            names.add(t)
        i += 1
    return names


def test_metric_names_reads_what_an_expression_names():
    assert metric_names('sum by (wizard, kind) (increase(neverdark_transitions_total'
                        '{job="neverdark", wizard=~"a|b"}[5m]))') == {"neverdark_transitions_total"}
    assert metric_names("histogram_quantile(0.95, sum without (instance) (rate("
                        "x_bucket[1m]))) > on (job) group_left (wizard) y or vector(0)") \
        == {"x_bucket", "y"}
    assert metric_names('absent(up{job="neverdark"}) and time() - z offset 1h30m > bool 3') \
        == {"up", "z"}
    assert metric_names("2e3-w/1.5*v") == {"w", "v"}


def family_of(name: str, families: dict) -> str | None:
    for suffix in ("", "_bucket", "_sum", "_count"):
        base = name[: len(name) - len(suffix)] if suffix and name.endswith(suffix) else name
        if base in families and (not suffix or families[base][0] == "histogram"):
            return base
    return None


# --- the rules --------------------------------------------------------------------------------

def rule_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [(r.get("alert") or r.get("record"), r["expr"])
            for g in doc["groups"] for r in g["rules"]]


def test_promtool_checks_the_rules():
    proc = run_promtool("check", "rules", "alerts.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in proc.stdout


def test_promtool_unit_tests_pass():
    proc = run_promtool("test", "rules", "alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_rule_has_a_unit_test():
    tests = yaml.safe_load((MON / "alerts_test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])
              if t.get("exp_alerts")}
    assert {name for name, _ in rule_exprs()} == tested


@pytest.mark.parametrize("alert, old, new", [
    # fires too early without its `for:`
    ("NeverdarkWizardOnFallback", "        for: 15m\n", ""),
    # a 429 taken for a rejected key
    ("NeverdarkKeyRejected", 'max by (job, instance, wizard, backend) (neverdark_key_rejected'
     '{job="neverdark"}) == 1', 'sum by (job, instance, wizard, backend) (increase('
     'neverdark_probe_failures_total{job="neverdark"}[15m])) > 0'),
    # an OOM kill that never resolves
    ("NeverdarkUnitOOMKilled", 'increase(neverdark_unit_oom_kills_total{job="neverdark"}[15m])'
     ' > 0', 'neverdark_unit_oom_kills_total{job="neverdark"} > 0'),
])
def test_the_unit_tests_catch_a_broken_rule(tmp_path, alert, old, new):
    """The promtool tests can fail: each of these wrong rules makes them fail."""
    text = ALERTS.read_text()
    assert text.count(old) == 1, old
    (tmp_path / "alerts.yml").write_text(text.replace(old, new))
    shutil.copy(MON / "alerts_test.yml", tmp_path)
    proc = run_promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert proc.returncode != 0 and alert in proc.stdout + proc.stderr, proc.stdout


def test_rules_name_only_listed_metrics():
    families = listed()
    for alert, expr in rule_exprs():
        for name in metric_names(expr) - PROMETHEUS_OWN:
            assert family_of(name, families), f"{alert}: {name} is not in monitoring/metrics.txt"


# --- the dashboard ----------------------------------------------------------------------------

GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable, Grafana's variables given
    values as Grafana would (label_values(SELECTOR, LABEL) reads SELECTOR)."""
    doc = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((f"panel {p['title']!r} target {t['refId']}", t["expr"]))
            walk(p.get("panels", []))
    walk(doc["panels"])
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*[A-Za-z_]\w*\)", q.strip())
            assert m, f"variable {v['name']}: {q}"
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def concrete(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?[A-Za-z_]\w*\}?", ".*", expr)


def check_as_rules(exprs: list[tuple[str, str]], tmp_path: Path) -> subprocess.CompletedProcess:
    """promtool parses each expression as a recording rule's."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": concrete(e)} for i, (_, e) in enumerate(exprs)]}]}
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    return run_promtool("check", "rules", "dashboard-rules.yml", cwd=tmp_path)


def test_every_dashboard_expression_parses(tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    proc = check_as_rules(exprs, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout


def test_a_broken_dashboard_expression_is_caught(tmp_path):
    proc = check_as_rules([("broken", 'sum by (wizard (neverdark_dark{job="neverdark"})')],
                          tmp_path)
    assert proc.returncode != 0


def test_dashboard_names_only_listed_metrics():
    families, used = listed(), set()
    for where, expr in dashboard_exprs():
        for name in metric_names(concrete(expr)) - PROMETHEUS_OWN:
            family = family_of(name, families)
            assert family, f"dashboard {where}: {name} is not in monitoring/metrics.txt"
            used.add(family)
    assert used == set(families), f"listed but on no panel: {sorted(set(families) - used)}"


def test_dashboard_panels_use_the_datasource_variable():
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"]
    for p in doc["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]


# --- the list against what the sidecar serves -------------------------------------------------

@pytest.fixture(scope="module")
def metrics_text(tmp_path_factory) -> str:
    return sidecar_outputs(tmp_path_factory.mktemp("sidecar"))[1]


# Families with no sample in that daemon's first rounds: nothing switched, no hook configured.
# (tests/test_sidecar_daemon.py and tests/test_notices.py see them with samples.)
NO_SAMPLES_HERE = {"neverdark_transitions_total", "neverdark_interrupted_switches_total",
                   "neverdark_hook_deliveries_total"}


@pytest.fixture(scope="module")
def exported(metrics_text) -> dict[str, tuple[str, set[frozenset[str]]]]:
    """family -> (type, label-name sets of its samples), from a real sidecar's /metrics."""
    text = metrics_text
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
    out = {name: (kind, set()) for name, kind in types.items()
           if not (name.endswith("_created") and kind == "gauge")}   # prometheus_client's
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        name = name.split()[0]
        labels = frozenset(re.findall(r'([A-Za-z_]\w*)="', rest.rpartition("}")[0])) - {"le"}
        family = next((f for f in (name, name.rsplit("_", 1)[0]) if f in out), None)
        if family:
            out[family][1].add(labels)
    return out


FAMILIES = listed()


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=f"not exported yet: {PENDING[n]}"))
    if n in PENDING else n for n in FAMILIES])
def test_the_sidecar_exports_each_listed_metric(name, exported):
    kind, labels = FAMILIES[name]
    assert name in exported, f"the sidecar's /metrics has no {name}"
    assert exported[name][0] == kind, f"{name}: exported as {exported[name][0]}, listed {kind}"
    assert exported[name][1] or name in NO_SAMPLES_HERE, f"{name}: no sample to check"
    for seen in exported[name][1]:
        assert seen == labels, f"{name}: exported with labels {sorted(seen)}, listed {sorted(labels)}"


def test_units_and_host_memory_as_the_cgroup_tree_says(metrics_text):
    """The stand-in units (testbed/sidecar_outputs.py: UNITS) come out as their cgroup v2 files
    and `systemctl show` say; the host's memory as /proc/meminfo says."""
    from prometheus_client.parser import text_string_to_metric_families
    from testbed.sidecar_outputs import GATEWAY_UNIT, MODEL_UNIT
    got = {(s.name, s.labels.get("unit")): s.value
           for f in text_string_to_metric_families(metrics_text) for s in f.samples}
    assert got[("neverdark_unit_memory_bytes", MODEL_UNIT)] == 123456789
    assert got[("neverdark_unit_memory_max_bytes", MODEL_UNIT)] == 536870912
    assert got[("neverdark_unit_memory_max_bytes", GATEWAY_UNIT)] == 0      # "max": no limit
    assert got[("neverdark_unit_oom_kills_total", MODEL_UNIT)] == 0
    assert got[("neverdark_unit_oom_kills_total", GATEWAY_UNIT)] == 2
    assert got[("neverdark_unit_restarts_total", GATEWAY_UNIT)] == 4
    assert got[("neverdark_unit_active", MODEL_UNIT)] == 1
    assert got[("neverdark_unit_active", GATEWAY_UNIT)] == 0
    total = got[("neverdark_host_memory_total_bytes", None)]
    assert 0 < got[("neverdark_host_memory_available_bytes", None)] <= total
    assert total == int(Path("/proc/meminfo").read_text().split()[1]) * 1024


def test_pending_names_are_all_listed():
    assert set(PENDING) <= set(FAMILIES)
