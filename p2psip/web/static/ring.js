// The ring page: renders /status.json (pushed by Server-Sent Events on /events) as an SVG ring and tables.
// Every string from the peer goes into the DOM as text (textContent / setAttribute), never as markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const R = 120;

function angleOf(id) {
  // Node ids are 128-bit hex; the first 52 bits place a node on the circle precisely enough.
  return (parseInt(id.slice(0, 13), 16) / 2 ** 52) * 2 * Math.PI;
}

function point(id, r = R) {
  const a = angleOf(id) - Math.PI / 2;
  return [r * Math.cos(a), r * Math.sin(a)];
}

function el(name, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

function fillTable(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  clear(body);
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const cell of row) {
      const td = document.createElement("td");
      td.textContent = cell === null || cell === undefined ? "—" : String(cell);
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}

function render(status) {
  const self = { id: status.node_id, addr: status.overlay };
  document.getElementById("self-addr").textContent = `${status.overlay} (${status.node_id.slice(0, 8)})`;
  const known = new Map();
  known.set(self.id, { ...self, roles: new Set(["self"]) });
  const add = (ref, role) => {
    if (!ref) return;
    const entry = known.get(ref.id) || { ...ref, roles: new Set() };
    entry.roles.add(role);
    known.set(ref.id, entry);
  };
  add(status.predecessor, "predecessor");
  (status.successors || []).forEach((s) => add(s, "successor"));
  (status.fingers || []).forEach((f) => add(f, "finger"));

  const arcs = document.getElementById("arcs");
  const chords = document.getElementById("chords");
  const nodes = document.getElementById("nodes");
  clear(arcs);
  clear(chords);
  clear(nodes);
  if (status.predecessor && status.predecessor.id !== self.id) {
    // This peer is responsible for the keys from its predecessor (exclusive) to itself (inclusive).
    const [x1, y1] = point(status.predecessor.id, R + 14);
    const [x2, y2] = point(self.id, R + 14);
    let sweep = angleOf(self.id) - angleOf(status.predecessor.id);
    if (sweep < 0) sweep += 2 * Math.PI;
    const large = sweep > Math.PI ? 1 : 0;
    arcs.appendChild(el("path", { d: `M ${x1} ${y1} A ${R + 14} ${R + 14} 0 ${large} 1 ${x2} ${y2}`, class: "arc" }));
  }
  const [sx, sy] = point(self.id);
  for (const [id, n] of known) {
    if (id === self.id) continue;
    const [x, y] = point(id);
    if (n.roles.has("successor")) chords.appendChild(el("line", { x1: sx, y1: sy, x2: x, y2: y, class: "succ" }));
    else if (n.roles.has("finger")) chords.appendChild(el("line", { x1: sx, y1: sy, x2: x, y2: y, class: "finger" }));
  }
  for (const [id, n] of known) {
    const [x, y] = point(id);
    const g = el("g", { class: `node ${[...n.roles].join(" ")}`, "data-id": id });
    g.appendChild(el("circle", { cx: x, cy: y, r: n.roles.has("self") ? 8 : 6 }));
    const [lx, ly] = point(id, R + 32);
    g.appendChild(el("text", { x: lx, y: ly, "text-anchor": "middle", "dominant-baseline": "middle" }, n.addr));
    g.appendChild(el("title", {}, `${n.addr} ${id} (${[...n.roles].join(", ")})`));
    nodes.appendChild(g);
  }
  document.getElementById("summary").textContent =
    `overlay "${status.overlay_name}": ${known.size} peers known, ${(status.stored || []).length} keys stored, ` +
    `up ${Math.round(status.uptime_s)} s` + (status.redacted ? " (names hidden off loopback)" : "");

  fillTable("stored", (status.stored || []).map((s) => [
    s.name, s.key.slice(0, 12), s.entries, (s.holders || []).join(", "), `${s.expires_in} s`, s.owner,
  ]));
  fillTable("hops", Object.entries(status.hop_histogram || {}).map(([h, n]) => [h, n]));
  fillTable("registrations", (status.registrations || []).map((r) => [r.aor, r.contact, `${r.expires_in} s`]));
  fillTable("calls", (status.calls || []).map((c) => [c.from, c.to, c.state]));
  const counters = Object.entries(status.counters || {}).filter(([, v]) => v !== 0).sort();
  fillTable("counters", counters);
}

function start() {
  const live = document.getElementById("live");
  const source = new EventSource("/events");
  source.onopen = () => { live.textContent = "live: yes"; };
  source.onerror = () => { live.textContent = "live: reconnecting…"; };
  source.onmessage = (event) => {
    try {
      const status = JSON.parse(event.data);
      render(status);
      window.p2psipStatus = status;
      document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    } catch (err) {
      live.textContent = `live: bad update (${err})`;
    }
  };
}

document.addEventListener("DOMContentLoaded", start);
