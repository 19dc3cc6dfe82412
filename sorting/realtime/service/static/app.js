// The operator page: server-sent events from /api/stream; the belt is painted on a canvas from
// the grey rows the service sends (attenuation of the high-energy channel, every sx-th column
// and sy-th line), particles outlined in their decision's colour.
"use strict";

const COLOURS = [[53, 167, 255], [255, 155, 26], [255, 45, 45], [209, 60, 255], [154, 154, 154]];
const FG = 6;  // grey level above which a picture pixel belongs to a rock (attenuation ~0.09)
const belt = document.getElementById("belt");
const ctx = belt.getContext("2d");
let W = belt.width, H = belt.height, sx = 4, sy = 4;
let ring = new Uint8Array(W * H), ringLine = new Float64Array(H).fill(-1), head = -1, newest = -1;
let particles = [];
let lineRate = null;

function $(id) { return document.getElementById(id); }
function fmt(x, d = 0) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Number(x).toLocaleString("en-US", {minimumFractionDigits: d, maximumFractionDigits: d});
}

function setup(hello) {
  sx = hello.sx || 4; sy = hello.sy || 4;
  W = hello.width || 320;
  lineRate = hello.line_rate_hz;
  belt.width = W; belt.height = H;
  belt.style.width = (2 * W) + "px"; belt.style.height = (2 * H) + "px";
  ring = new Uint8Array(W * H); ringLine.fill(-1); head = -1; newest = -1; particles = [];
}

function pushRow(line, src, off) {
  head = (head + 1) % H;
  if (src) ring.set(src.subarray(off, off + W), head * W); else ring.fill(0, head * W, head * W + W);
  ringLine[head] = line;
  newest = line;
}

function addBelt(b) {
  const bin = atob(b.data);
  const rows = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) rows[i] = bin.charCodeAt(i);
  let line = b.first_line;
  if (newest >= 0 && line > newest + sy) {  // a gap: blank rows, as many as lines missing
    const missing = Math.min(Math.floor((line - newest) / sy) - 1, H);
    for (let k = 0; k < missing; k++) pushRow(newest + sy, null, 0);
  }
  for (let r = 0; r < b.rows; r++, line += sy) pushRow(line, rows, r * W);
}

function render() {
  if (head < 0) return;
  const img = ctx.createImageData(W, H);
  const px = img.data;
  for (let y = 0; y < H; y++) {
    const r = ((head - y) % H + H) % H;
    const base = r * W;
    for (let x = 0; x < W; x++) {
      const g = ring[base + x], o = 4 * (y * W + x);
      px[o] = g; px[o + 1] = g; px[o + 2] = g; px[o + 3] = 255;
    }
  }
  const oldest = newest - (H - 1) * sy;
  particles = particles.filter(p => p[1] >= oldest);
  for (const p of particles) outline(px, p);
  ctx.putImageData(img, 0, 0);
}

function rowOf(line) { return Math.floor((newest - line) / sy); }

function outline(px, p) {
  const [l0, l1, c0, c1, code] = p;
  const colour = COLOURS[code] || COLOURS[0];
  const y0 = Math.max(0, rowOf(l1)), y1 = Math.min(H - 1, rowOf(l0));
  const x0 = Math.max(0, Math.floor(c0 / sx)), x1 = Math.min(W - 1, Math.floor(c1 / sx));
  if (y0 > y1 || x0 > x1) return;
  const fg = (x, y) => {
    if (x < x0 || x > x1 || y < y0 || y > y1) return false;
    const r = ((head - y) % H + H) % H;
    return ring[r * W + x] > FG;
  };
  let painted = 0;
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      if (!fg(x, y)) continue;
      if (fg(x - 1, y) && fg(x + 1, y) && fg(x, y - 1) && fg(x, y + 1)) continue;
      const o = 4 * (y * W + x);
      px[o] = colour[0]; px[o + 1] = colour[1]; px[o + 2] = colour[2];
      painted++;
    }
  }
  if (painted === 0) {  // too faint in the picture: its box
    for (let x = x0; x <= x1; x++) for (const y of [y0, y1]) paint(px, x, y, colour);
    for (let y = y0; y <= y1; y++) for (const x of [x0, x1]) paint(px, x, y, colour);
  }
}

function paint(px, x, y, c) { const o = 4 * (y * W + x); px[o] = c[0]; px[o + 1] = c[1]; px[o + 2] = c[2]; }

function status(s) {
  const st = $("state"); st.textContent = s.state; st.className = "badge " + s.state;
  const cn = $("connection");
  cn.textContent = s.connected ? "detector: " + (s.peer || "connected") : "detector: not connected";
  cn.className = "badge " + (s.connected ? "on" : "off");
  $("lines").textContent = fmt(s.lines);
  $("throughput").textContent = fmt(s.throughput_lines_s);
  $("line-rate").textContent = fmt(s.line_rate_hz);
  const share = s.line_rate_hz && s.throughput_lines_s !== null ? s.throughput_lines_s / s.line_rate_hz : 0;
  $("throughput-bar").style.width = Math.min(100, 100 * share) + "%";
  $("particles").textContent = fmt(s.particles);
  $("product").textContent = fmt(s.product);
  $("reject").textContent = fmt(s.reject);
  $("mass-pull").textContent = s.mass_pull === null ? "–" : fmt(100 * s.mass_pull, 1) + " %";
  $("ejects").textContent = fmt(s.ejects);
  $("late").textContent = fmt(s.late);
  $("undecided").textContent = fmt(s.undecided);
  $("threshold").textContent = s.threshold === null ? "–" : fmt(s.threshold, 4);
  $("model").textContent = s.model || "–";
  $("changes").textContent = fmt(s.changes);
  const lw = s.latency_window_ms || {};
  $("p50").textContent = lw.p50 === null || lw.p50 === undefined ? "–" : fmt(lw.p50, 1);
  $("p99").textContent = lw.p99 === null || lw.p99 === undefined ? "–" : fmt(lw.p99, 1);
  latency(lw);
}

function latency(lw) {
  const c = $("latency"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const counts = lw.counts || [], labels = lw.buckets_le || [];
  const n = counts.length;
  if (!n) return;
  const max = Math.max(1, ...counts), bw = c.width / n;
  g.font = "9px sans-serif";
  for (let i = 0; i < n; i++) {
    const h = (c.height - 16) * counts[i] / max;
    g.fillStyle = "#35a7ff";
    g.fillRect(i * bw + 1, c.height - 14 - h, bw - 2, h);
    g.fillStyle = "#8a949e";
    g.fillText(String(labels[i]), i * bw + 1, c.height - 3);
  }
}

function alarms(list) {
  const ul = $("alarms");
  if (!list.length) return;
  const none = ul.querySelector(".none");
  if (none) none.remove();
  for (const a of list) {
    const li = document.createElement("li");
    const t = new Date(a.time * 1000).toLocaleTimeString();
    const k = document.createElement("span");
    k.className = "kind"; k.textContent = t + " " + a.kind;
    li.appendChild(k);
    li.appendChild(document.createTextNode((a.count > 1 ? a.count + " " : "") + a.text));
    ul.insertBefore(li, ul.firstChild);
  }
  while (ul.children.length > 50) ul.removeChild(ul.lastChild);
}

function card(c) {
  const t = $("card");
  t.textContent = "";
  for (const [k, v] of Object.entries(c || {})) {
    const tr = document.createElement("tr");
    const th = document.createElement("th"); th.textContent = k;
    const td = document.createElement("td"); td.textContent = typeof v === "object" ? JSON.stringify(v) : String(v);
    tr.appendChild(th); tr.appendChild(td); t.appendChild(tr);
  }
}

function connect() {
  const es = new EventSource("/api/stream");
  es.addEventListener("hello", ev => {
    const m = JSON.parse(ev.data);
    setup(m.hello || {});
    status(m.status); card(m.card); alarms(m.alarms || []);
    $("link").textContent = "page: live"; $("link").className = "badge on";
  });
  es.addEventListener("update", ev => {
    const m = JSON.parse(ev.data);
    if (m.belt && (m.belt.width !== W || m.belt.sy !== sy)) setup(m.belt);
    if (m.belt) addBelt(m.belt);
    for (const p of m.particles || []) particles.push(p);
    status(m.status);
    if (m.card) card(m.card);
    alarms(m.alarms_new || []);
    render();
  });
  es.onerror = () => { $("link").textContent = "page: reconnecting"; $("link").className = "badge off"; };
}

connect();
