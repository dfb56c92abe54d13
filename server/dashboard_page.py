"""The dashboard's one HTML page: plain HTML, CSS and a small script, nothing fetched elsewhere.

The script polls ``/api/state`` every ``__POLL_MS__`` ms and fills the tables with
``textContent`` only (site names and reasons are never parsed as HTML); the figure is
``/curves.svg``, reloaded when a round is committed. No build step, no external resource.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>idc-fl coordinator</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
 h1 { font-size: 1.4em; margin-bottom: 0.2em; }
 h2 { font-size: 1.1em; margin-top: 1.4em; }
 table { border-collapse: collapse; }
 th, td { text-align: left; padding: 0.25em 0.9em 0.25em 0; border-bottom: 1px solid #ddd; }
 .muted { color: #666; font-size: 0.9em; }
 .online, .ok { color: #11722b; font-weight: 600; }
 .offline, .revoked, .failed, .bad { color: #b00020; font-weight: 600; }
 meter { width: 10em; }
 img { max-width: 100%; border: 1px solid #eee; }
</style>
</head>
<body>
<h1>idc-fl coordinator</h1>
<div class="muted">read-only; refreshes every __POLL_MS__ ms;
 <span id="updated">loading</span></div>
<div class="muted" id="coordinator"></div>
<div id="superlink"></div>

<h2>Audit log</h2>
<div id="audit">not read yet</div>

<h2>Sites</h2>
<table><thead><tr><th>site</th><th>status</th><th>last seen</th><th>key fingerprint</th>
</tr></thead><tbody id="sites"></tbody></table>
<div id="others" class="muted"></div>

<h2>Run</h2>
<div id="run">none submitted yet</div>
<div id="round"></div>

<h2>Privacy spent (epsilon, per site, against its cap)</h2>
<table><thead><tr><th>site</th><th>epsilon spent</th><th>cap</th><th>left</th><th></th>
</tr></thead><tbody id="privacy"></tbody></table>

<h2>Curves per round</h2>
<img id="curves" alt="metric curves per round, one line per site" src="/curves.svg">

<script>
"use strict";
let shownRound = null;
function el(id) { return document.getElementById(id); }
function text(id, value, cls) {
  const node = el(id); node.textContent = value; node.className = cls || "";
}
function row(cells, classes) {
  const tr = document.createElement("tr");
  cells.forEach((value, i) => {
    const td = document.createElement("td");
    if (value instanceof Node) { td.appendChild(value); } else { td.textContent = value; }
    if (classes && classes[i]) { td.className = classes[i]; }
    tr.appendChild(td);
  });
  return tr;
}
function fmt(x) { return x === null || x === undefined ? "none" : x.toFixed(3); }
function fill(id, rows) { el(id).replaceChildren(...rows); }
function showSites(s) {
  fill("sites", s.sites.map(x => row([x.site, x.status, x.seen || "", x.key.slice(0, 16)],
                                     [null, x.status.replace(" ", "-")])));
  const others = s.revoked.map(n => "revoked key: " + n).concat(
    s.strangers.map(n => "not registered: " + n));
  text("others", others.join("; "));
}
function showRun(r) {
  if (!r) { text("run", "none submitted yet"); text("round", ""); return; }
  text("run", "run " + r.id + ": " + r.status + ", round " + r.completed + " of " +
       (r.rounds === null ? "?" : r.rounds) + " completed" + (r.error ? " (" + r.error + ")" : ""),
       r.status === "failed" ? "failed" : "");
  const p = r.progress;
  if (!p) { text("round", ""); return; }
  const state = p.committed ? "committed" : "in progress";
  text("round", "round " + p.round + " " + state + ": " + p.received.length + " of " +
       p.selected.length + " update(s) received" +
       (p.received.length ? " (" + p.received.join(", ") + ")" : "") +
       (p.rejected.length ? "; rejected: " + p.rejected.join(", ") : ""));
  if (r.completed !== shownRound) {
    shownRound = r.completed;
    el("curves").src = "/curves.svg?round=" + r.completed;
  }
}
function showPrivacy(rows) {
  fill("privacy", rows.map(x => {
    const bar = document.createElement("meter");
    if (x.cap !== null && x.epsilon !== null) { bar.max = x.cap; bar.value = x.epsilon; }
    return row([x.site, x.epsilon === null ? "no DP" : fmt(x.epsilon),
                x.cap === null ? "no cap" : fmt(x.cap), fmt(x.left), bar]);
  }));
}
async function poll() {
  try {
    const response = await fetch("/api/state", {cache: "no-store"});
    const s = await response.json();
    if (!response.ok) { throw new Error(s.error || "HTTP " + response.status); }
    text("coordinator", "coordinator folder: " + s.coordinator);
    text("superlink", s.superlink);
    const a = s.audit;
    text("audit", (a.ok ? "verified: " : "VERIFICATION FAILED: ") + a.reason +
         " (key " + a.key + ")", a.ok ? "ok" : "bad");
    showSites(s); showRun(s.run); showPrivacy(s.privacy);
    text("updated", "updated " + new Date().toLocaleTimeString());
  } catch (err) {
    text("updated", "cannot show the federation: " + err.message, "bad");
  }
  setTimeout(poll, __POLL_MS__);
}
poll();
</script>
</body>
</html>
"""
