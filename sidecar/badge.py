"""A wizard's small view for another dashboard to embed (the seed's "Workshop panel"):
`GET /wizards/<name>.json` and `GET /wizards/<name>.svg`, served by the sidecar's HTTP API.

The JSON is a stable subset of /status (which backend answers, whether that is the primary,
since when and why); the SVG is a two-part badge whose colour says the same at a glance. Both
are built from a read of the policy (runner.status()), so serving them changes nothing.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

# state -> badge colour: the primary answers / a fallback answers / nothing answers / unknown
COLOURS = {"primary": "#2e7d32", "fallback": "#ef6c00", "dark": "#c62828", "unknown": "#757575"}


def summary(name: str, chain: list[str], view: dict) -> dict:
    """The embeddable view of one wizard; `chain` is its backends in order, `view` its /status
    entry."""
    active = view.get("active")
    if view.get("dark"):
        state = "dark"
    elif active is None:
        state = "unknown"
    else:
        state = "primary" if chain and active == chain[0] else "fallback"
    return {"wizard": name, "state": state, "active": active,
            "primary": chain[0] if chain else None, "since": view.get("since"),
            "since_iso": view.get("since_iso"), "why": view.get("why"),
            "pinned": bool(view.get("pinned")), "switching": bool(view.get("switching")),
            "backends": {b: bool((view.get("backends") or {}).get(b, {}).get("healthy"))
                         for b in chain}}


def _width(text: str) -> int:
    # Verdana 11px averages ~7 px a character; the badge only needs to fit, not to kern.
    return 10 + 7 * len(text)


def svg(s: dict) -> bytes:
    """A flat badge: `<wizard> | <active backend or state>`."""
    left = s["wizard"]
    right = s["active"] if s["state"] in ("primary", "fallback") else s["state"]
    if s["state"] == "fallback":
        right = f"{right} (fallback)"
    lw, rw = _width(left), _width(right)
    colour = COLOURS[s["state"]]
    l_text, r_text = escape(left), escape(right)
    title = escape(f"{left}: {right}" + (f" — {s['why']}" if s.get("why") else ""),
                   {'"': "&quot;"})   # it is also an attribute's value
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{lw + rw}" height="20" '
            f'role="img" aria-label="{title}"><title>{title}</title>'
            f'<rect width="{lw}" height="20" fill="#555"/>'
            f'<rect x="{lw}" width="{rw}" height="20" fill="{colour}"/>'
            f'<g fill="#fff" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11" '
            f'text-anchor="middle"><text x="{lw / 2}" y="14">{l_text}</text>'
            f'<text x="{lw + rw / 2}" y="14">{r_text}</text></g></svg>\n').encode()
