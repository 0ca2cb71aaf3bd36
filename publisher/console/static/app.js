// hotreload console: polls /api/state and renders it. Every value from Redis is put in the
// page as text (textContent), never as HTML: worker ids, errors and content are anyone's.
"use strict";

const ui = { open: new Set(), diffs: new Map(), state: null, interval: 1000, timer: null };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = String(value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function short(sha) { return sha ? String(sha).slice(0, 12) : "-"; }

function age(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  if (seconds < 60) return seconds.toFixed(1) + " s ago";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
  return Math.floor(seconds / 3600) + " h ago";
}

function when(iso) {
  if (!iso) return "-";
  const d = new Date(iso);
  return isNaN(d) ? String(iso) : d.toLocaleString();
}

// converged, behind, rejected, ... or the rollout's canary / halted when one runs
function displayState(summary) {
  const rollout = summary.rollout;
  if (rollout && ["canary", "halted", "rolled-back"].includes(rollout.state)) return rollout.state;
  return summary.state;
}

function verdict(summary) {
  const live = summary.live.length;
  switch (summary.state) {
    case "unpublished": return "nothing published yet, " + live + " live workers";
    case "rejected": return "rejected by " + summary.rejected.length + "/" + live + " live workers";
    case "no-live-workers": return "no live workers";
    case "holding": return summary.holding.length + "/" + live + " live workers hold a newer version";
    default: return summary.current.length + "/" + live + " live workers run it";
  }
}

function rolloutLine(rollout) {
  if (!rollout || !rollout.state || rollout.state === "none") return null;
  const parts = ["rollout: " + rollout.state];
  if (rollout.version) parts.push("v" + rollout.version);
  if (rollout.of) parts.push("(of v" + rollout.of + ")");
  if (rollout.canary && rollout.canary.length) parts.push("canary on " + rollout.canary.join(", "));
  const line = el("div", { class: "rollout", "data-rollout": rollout.state }, parts.join(" "));
  if (rollout.reason) line.append(" — " + rollout.reason);
  return line;
}

// a history entry's part in a rollout (rollout control marks canary / promote / halt /
// rollback entries, with the version they are about and a canary's audience), or null
function rolloutNote(row) {
  if (!row.rollout) return null;
  let text = row.rollout + (row.rollout_of ? " of v" + row.rollout_of : "");
  if (row.audience && row.audience.length) text += " for " + row.audience.join(", ");
  return text;
}

function workersTable(summary, workers, showGone) {
  const rows = workers.filter((w) => w.key === summary.key && (showGone || w.liveness !== "gone"));
  const gone = workers.filter((w) => w.key === summary.key && w.liveness === "gone").length;
  if (!rows.length) {
    const text = gone ? gone + " gone (stopped) workers: tick “show gone workers”" : "no worker has reported for this key";
    return el("p", { class: "empty" }, text);
  }
  const current = new Set(summary.current);
  const head = el("tr", {}, ...["worker", "version", "sha256", "status", "error", "heartbeat", "live"].map((h) => el("th", { text: h })));
  const body = rows.map((w) => {
    const behind = w.liveness === "live" && summary.newest_version !== null && !current.has(w.worker);
    let error = w.error || "";
    if (error && w.rejected_version && w.status !== "holding") error = "v" + w.rejected_version + ": " + error;
    return el("tr", { class: "worker", "data-worker": w.worker, "data-liveness": w.liveness, "data-status": w.status },
      el("td", { class: "mono", text: w.worker }),
      el("td", { class: "num" + (behind ? " behind" : ""), text: w.version || "-" }),
      el("td", { class: "mono", text: short(w.sha256) }),
      el("td", { class: "status-" + w.status, text: w.status }),
      el("td", { class: "error", text: error }),
      el("td", { class: "num", text: age(w.heartbeat_age_s) }),
      el("td", { text: w.liveness }));
  });
  const table = el("table", { class: "workers" }, el("thead", {}, head), el("tbody", {}, ...body));
  if (gone && !showGone) return el("div", {}, table, el("p", { class: "empty" }, "and " + gone + " gone (stopped) workers"));
  return table;
}

function details(id, title, content) {
  const node = el("details", { "data-section": id }, el("summary", { text: title }), content);
  node.open = ui.open.has(id);
  node.addEventListener("toggle", () => { if (node.open) ui.open.add(id); else ui.open.delete(id); });
  return node;
}

function timeline(key, pages) {
  const items = (pages.timeline || []).map((v) => {
    const head = el("div", {}, el("strong", { text: "v" + v.version }), " published " + when(v.published_at) + " by ", el("span", { class: "mono", text: v.publisher }));
    const note = rolloutNote(v);
    if (note) head.append(" (" + note + ")");
    const acks = v.acks.map((a) => {
      let text = a.status + (a.after_s !== null ? " after " + a.after_s + " s" : "") + (a.at ? " (" + when(a.at) + ")" : "");
      if (a.unchanged) text += ", unchanged";
      const item = el("li", { class: "ack-" + a.status }, el("span", { class: "mono", text: a.worker }), " " + text);
      if (a.error) item.append(": ", el("span", { class: "reason", text: a.error }));
      return item;
    });
    return el("li", { "data-version": v.version }, head, acks.length ? el("ul", {}, ...acks) : el("div", { class: "empty", text: "no worker reported it" }));
  });
  return details(key + ":timeline", "timeline (versions published, workers applying or rejecting them)",
    items.length ? el("ol", { class: "timeline" }, ...items) : el("p", { class: "empty", text: "no versions" }));
}

function diffBlock(key) {
  const shown = ui.diffs.get(key);
  if (!shown) return null;
  if (shown.error) return el("p", { class: shown.sensitive ? "masked" : "memory", text: shown.error });
  const lines = shown.lines.map((line) => {
    const kind = line.startsWith("+++") || line.startsWith("---") ? "file" : line[0] === "+" ? "add" : line[0] === "-" ? "del" : line[0] === "@" ? "hunk" : "";
    return el("span", { class: kind }, line + "\n");
  });
  return el("pre", { class: "diff", "data-diff": shown.old + ".." + shown.new }, ...(lines.length ? lines : ["(no difference)"]));
}

async function showDiff(key, old, neu) {
  const query = new URLSearchParams({ key, old: String(old), new: String(neu) });
  try {
    const response = await fetch("/api/diff?" + query.toString());
    const body = await response.json();
    ui.diffs.set(key, response.ok ? body : { error: body.error, sensitive: !!body.sensitive });
  } catch (error) {
    ui.diffs.set(key, { error: "diff failed: " + error });
  }
  ui.open.add(key + ":history");
  render();
}

function historyTable(key, pages) {
  const rows = pages.history || [];
  const head = el("tr", {}, ...["version", "sha256", "size", "published", "applied", "rejected", "publisher", ""].map((h) => el("th", { text: h })));
  const body = rows.map((r, i) => {
    const older = rows.slice(i + 1).find((o) => o.version !== null && !o.malformed);
    const button = older && r.version !== null && !r.malformed
      ? el("button", { class: "diff", onclick: () => showDiff(key, older.version, r.version) }, "diff v" + older.version + "→v" + r.version)
      : null;
    const notes = [r.malformed ? "malformed: " + r.malformed : null, r.verified === false ? "unverified" : null,
      r.sensitive ? "sensitive" : null, rolloutNote(r)].filter(Boolean).join("; ");
    return el("tr", { "data-version": r.version },
      el("td", { class: "num", text: r.version === null ? "?" : r.version }),
      el("td", { class: "mono", text: short(r.sha256) }),
      el("td", { class: "num", text: r.size === null ? "-" : r.size + " B" }),
      el("td", { text: when(r.published_at) }),
      el("td", { class: "num", text: r.applied }),
      el("td", { class: "num" + (r.rejected ? " error" : ""), text: r.rejected }),
      el("td", { class: "mono", text: r.publisher + (notes ? " (" + notes + ")" : "") }),
      el("td", {}, button));
  });
  const sensitive = rows.length && rows[0].sensitive && !(ui.state && ui.state.reveal);
  return details(key + ":history", "history (" + rows.length + " versions) and diffs",
    el("div", {}, sensitive ? el("p", { class: "masked", text: "sensitive: diffs are masked (start the console with --reveal to see them)" }) : null,
      el("table", { class: "history" }, el("thead", {}, head), el("tbody", {}, ...body)), diffBlock(key)));
}

function keySection(summary, state, showGone) {
  const shown = displayState(summary);
  const title = el("h2", {},
    el("span", { class: "keyname", text: summary.key }),
    el("span", { class: "badge state", "data-state": shown, text: shown }),
    summary.newest_version !== null ? el("span", { class: "version", text: "v" + summary.newest_version + " (" + short(summary.newest_sha256) + ")" }) : null,
    el("span", { class: "detail", text: verdict(summary) + (summary.stale.length ? "; " + summary.stale.length + " stale" : "") + (summary.gone.length ? ", " + summary.gone.length + " gone" : "") }));
  const rejections = summary.rejected.map((r) => el("li", { class: "rejection", "data-worker": r.worker },
    "v" + r.version + " rejected by ", el("span", { class: "who", text: r.worker }), ": ", el("span", { class: "reason", text: r.error || "(no reason given)" })));
  const pages = (state.keys || {})[summary.key] || {};
  return el("section", { class: "key", "data-key": summary.key, "data-state": shown },
    title,
    rolloutLine(summary.rollout),
    rejections.length ? el("ul", { class: "rejections" }, ...rejections) : null,
    workersTable(summary, state.workers || [], showGone),
    timeline(summary.key, pages),
    historyTable(summary.key, pages));
}

function render() {
  const state = ui.state;
  if (!state) return;
  const where = document.getElementById("where");
  where.textContent = (state.redis || "") + "  prefix " + (state.prefix || "");
  const conn = document.getElementById("conn");
  conn.dataset.connected = String(!!state.connected);
  conn.textContent = state.connected ? "connected" : "disconnected";
  document.getElementById("updated").textContent = state.generated_at ? "updated " + when(state.generated_at) : "";
  const banner = document.getElementById("banner");
  const problems = [];
  if (!state.connected && state.error) problems.push("Redis cannot be read: " + state.error + " (showing the last state seen; retrying)");
  if (state.redis_refuses_writes) problems.push("Redis refuses writes: " + state.redis_refuses_writes);
  for (const [key, reason] of Object.entries(state.unreadable || {})) problems.push(key + " cannot be read: " + reason);
  banner.hidden = !problems.length;
  banner.replaceChildren(...problems.map((p) => el("div", { text: p })));
  const showGone = document.getElementById("show-gone").checked;
  const main = document.getElementById("keys");
  const sections = (state.summary || []).map((s) => keySection(s, state, showGone));
  main.replaceChildren(...(sections.length ? sections : [el("p", { class: "empty", text: "no config keys under prefix " + state.prefix })]));
}

async function poll() {
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    ui.state = await response.json();
    if (ui.state.interval_s) ui.interval = Math.max(100, ui.state.interval_s * 1000);
  } catch (error) {
    if (ui.state) ui.state = Object.assign({}, ui.state, { connected: false, error: "the console itself cannot be reached (" + error.message + ")" });
  }
  // re-rendering would clear a selection: an operator copying an error keeps it
  const selecting = String(document.getSelection ? document.getSelection() : "") !== "";
  if (!selecting) render();
  ui.timer = setTimeout(poll, ui.interval);
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("show-gone").addEventListener("change", render);
  poll();
});
