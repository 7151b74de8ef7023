"""The embeddable per-wizard view and badge (sidecar/badge.py) and their routes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from sidecar import badge
from sidecar.http_api import HttpApi

CHAIN = ["claude", "local"]


def view(active, dark=False, healthy=("claude", "local"), why="startup"):
    return {"active": active, "dark": dark, "since": 1.0, "since_iso": "x", "why": why,
            "pinned": False, "switching": False,
            "backends": {b: {"healthy": b in healthy} for b in CHAIN}}


@pytest.mark.parametrize("v,state", [
    (view("claude"), "primary"),
    (view("local", healthy=("local",)), "fallback"),
    (view("local", dark=True, healthy=()), "dark"),
    (view(None), "unknown"),
])
def test_the_state_follows_the_active_backend_and_darkness(v, state):
    s = badge.summary("merlin", CHAIN, v)
    assert s["state"] == state
    assert s["backends"] == {b: v["backends"][b]["healthy"] for b in CHAIN}
    root = ET.fromstring(badge.svg(s))          # well-formed SVG
    assert badge.COLOURS[state] in ET.tostring(root, encoding="unicode")


def test_names_and_reasons_are_escaped_in_the_svg():
    s = badge.summary("m", ["a<b>&c"], view("a<b>&c", why='x"<script>'))
    text = badge.svg(s).decode()
    ET.fromstring(text)
    assert "<script>" not in text and "a&lt;b&gt;&amp;c" in text


def test_routes_answer_json_svg_and_404():
    views = {"merlin": badge.summary("merlin", CHAIN, view("claude"))}
    api = HttpApi(lambda: {}, lambda: "", lambda: True, views.get)
    code, ctype, body = api.route("GET", "/wizards/merlin.json")
    assert (code, ctype) == (200, "application/json")
    assert json.loads(body)["state"] == "primary"
    code, ctype, body = api.route("GET", "/wizards/merlin.svg?ts=1")
    assert (code, ctype) == (200, "image/svg+xml") and body.startswith(b"<svg")
    for target in ("/wizards/nobody.json", "/wizards/merlin.png", "/wizards/merlin",
                   "/wizards/"):
        assert api.route("GET", target)[0] == 404, target
    assert api.route("POST", "/wizards/merlin.json")[0] == 405
