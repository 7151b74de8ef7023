// The neverdark panel: renders each status snapshot the server pushes (/api/events), or
// polls /api/status where EventSource is missing. Every value reaches the page as text
// (textContent, setAttribute), never as markup.
"use strict";
(function () {
  let snap = null;
  let receivedAt = 0;      // performance.now() when `snap` arrived: ages grow from there
  let connected = false;

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = String(v);
      else if (k === "css") Object.assign(node.style, v);   // CSSOM: allowed by the CSP
      else node.setAttribute(k, String(v));
    }
    for (const c of children || []) node.appendChild(c);
    return node;
  }

  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    const s = Math.max(0, Math.floor(seconds));
    if (s >= 3600) return `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
    if (s >= 60) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
    return `${s}s`;
  }

  function elapsed() { return (performance.now() - receivedAt) / 1000; }

  function bytes(n) {
    return n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(1)} GiB` : `${Math.round(n / 2 ** 20)} MiB`;
  }

  function wizardRow(name, w) {
    const chips = Object.entries(w.backends).map(([b, h]) => el("span", {
      class: "chip" + (b === w.active ? " active" : ""), "data-backend": b,
      "data-health": h.health, title: h.last_reason ? `last: ${h.last_reason}` : null,
      text: `${b} ${h.health}`}));
    const position = w.index === null || w.index === undefined ? ""
      : ` (${w.index + 1} of ${w.chain.length})`;
    const flags = [w.pinned ? "pinned" : "", w.switching ? "switching" : ""].filter(Boolean);
    const why = w.state === "unreachable" || (w.state === "unknown" && !w.active)
      ? w.problems.join("; ") : (w.why || "");
    return el("tr", {"data-wizard": name, "data-state": w.state, "data-active": w.active || ""}, [
      el("td", {class: "name", text: name}),
      el("td", {text: w.host}),
      el("td", {}, [el("span", {class: `badge ${w.state}`, text: w.state})]),
      el("td", {class: "active"}, [
        el("span", {text: (w.active || "?") + (flags.length ? ` [${flags.join(", ")}]` : "")}),
        el("span", {class: "chain", text: position})]),
      el("td", {class: "since", "data-age": w.since_age,
                title: w.since ? new Date(w.since * 1000).toISOString() : null,
                text: w.since_age === null ? "-" : ago(w.since_age + elapsed()) + " ago"}),
      el("td", {class: "why", text: why}),
      el("td", {class: "backends"}, chips),
    ]);
  }

  function hostRow(name, h) {
    const m = h.memory;
    const memory = el("td", {class: "memory"});
    if (m.total) {
      const free = m.available === null ? null : m.available / m.total;
      memory.appendChild(el("div", {text: free === null ? `? of ${bytes(m.total)}`
        : `${bytes(m.available)} free of ${bytes(m.total)} (${Math.round(100 * free)}%)`}));
      const meter = el("div", {class: "meter" + (m.low ? " low" : ""),
        title: `the plan keeps ${m.headroom_mb} MB free`}, [
        el("span", {css: {width: `${Math.round(100 * (1 - (free || 0)))}%`}}),
        el("i", {css: {left: `${Math.max(0, Math.min(100, Math.round(100 * (1 - m.headroom_mb * 2 ** 20 / m.total))))}%`}})]);
      memory.appendChild(meter);
    } else {
      memory.textContent = "-";
    }
    return el("tr", {"data-host": name, "data-reached": h.reached ? "yes" : "no"}, [
      el("td", {class: "name", text: name}),
      el("td", {text: h.reached ? `answered in ${h.seconds.toFixed(2)} s` : (h.error || "no answer")}),
      el("td", {class: "probe", text: h.last_probe_age === null ? "-"
        : ago(h.last_probe_age + elapsed()) + " ago"}),
      memory,
      el("td", {text: `plan ${m.planned_mb} of ${m.memory_mb} MB, ${m.headroom_mb} MB headroom`}),
      el("td", {class: "problems", text: h.problems.join("; ")}),
    ]);
  }

  function replaceRows(table, rows) {
    const body = document.querySelector(`#${table} tbody`);
    body.replaceChildren(...rows);
  }

  function render() {
    if (!snap) return;
    const s = snap.summary;
    for (const node of document.querySelectorAll("#summary .count")) {
      node.querySelector("b").textContent = s[node.dataset.state];
    }
    replaceRows("wizards", Object.entries(snap.wizards).map(([n, w]) => wizardRow(n, w)));
    replaceRows("hosts", Object.entries(snap.hosts).map(([n, h]) => hostRow(n, h)));
    document.getElementById("took").textContent =
      `${s.wizards} wizards on ${s.hosts} hosts, asked in ${snap.took} s`;
    document.body.dataset.version = snap.version;
    freshness();
  }

  function freshness() {
    const node = document.getElementById("freshness");
    if (!snap) return;
    node.textContent = (connected ? "" : "connection lost; ") + `updated ${ago(elapsed())} ago`;
    node.classList.toggle("lost", !connected);
  }

  function apply(doc) {
    snap = doc;
    receivedAt = performance.now();
    connected = true;
    render();
  }

  function poll() {
    fetch("/api/status", {cache: "no-store"})
      .then((r) => (r.ok ? r.json() : Promise.reject(r.status)))
      .then(apply, () => { connected = false; freshness(); })
      .finally(() => setTimeout(poll, 2000));
  }

  function connect() {
    if (!window.EventSource) { poll(); return; }
    const events = new EventSource("/api/events");
    events.onmessage = (e) => apply(JSON.parse(e.data));
    events.onopen = () => { connected = true; freshness(); };
    events.onerror = () => { connected = false; freshness(); };   // it reconnects by itself
  }

  // Ages move every second between snapshots, without asking the server.
  setInterval(() => { if (snap) render(); }, 1000);
  connect();
})();
