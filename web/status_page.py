"""The status page served at GET /status (web/status.py): one HTML document
with its style and script inline, no external asset. Its script polls
``status.json`` (relative, so it works under a proxy's prefix) every second
and draws on canvases; every chart carries ``data-chart="<figure>"`` and,
once drawn, ``data-points="<n>"`` (the samples or bars it shows), and the body
carries ``data-sidecar="up|down"``. Text from the server is only ever set as
text (``textContent``), never as HTML."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>shm-embed status</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2330; }
header { padding: 12px 20px; background: #1d2330; color: #fff; display: flex; gap: 18px; align-items: baseline;
         flex-wrap: wrap; }
header h1 { font-size: 18px; margin: 0; }
#state { font-weight: bold; padding: 2px 8px; border-radius: 4px; background: #777; }
#state[data-state="up"] { background: #1f8a4c; }
#state[data-state="down"] { background: #c0392b; }
#note { color: #ffcf70; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(500px, 1fr)); gap: 14px; padding: 14px; }
section { background: #fff; border-radius: 6px; padding: 10px 12px; box-shadow: 0 1px 2px rgba(0,0,0,.1); }
section h2 { font-size: 14px; margin: 0 0 6px; }
canvas { width: 100%; height: 180px; display: block; }
</style>
</head>
<body data-sidecar="unknown">
<header>
<h1>shm-embed</h1>
<span id="state" data-state="unknown">waiting for status.json</span>
<span id="facts"></span>
<span id="note"></span>
</header>
<main>
<section><h2>Texts and requests per second</h2>
<canvas data-chart="throughput" width="560" height="180"></canvas></section>
<section><h2>Queue depth (slots ready at the sidecar)</h2>
<canvas data-chart="queue_depth" width="560" height="180"></canvas></section>
<section><h2>Batch size (texts per model call, last 60 s)</h2>
<canvas data-chart="batch_size" width="560" height="180"></canvas></section>
<section><h2>Queue and compute latency, seconds (last 60 s)</h2>
<canvas data-chart="latency" width="560" height="180"></canvas></section>
<section><h2>Rings leased and busy slots</h2>
<canvas data-chart="rings" width="560" height="180"></canvas></section>
<section><h2>Texts per second, by model</h2>
<canvas data-chart="models" width="560" height="180"></canvas></section>
<section id="cache-section" hidden><h2>Cache hit rate</h2>
<canvas data-chart="cache" width="560" height="180"></canvas></section>
</main>
<script>
'use strict';
const HISTORY = 120;      // samples kept per series (two minutes at one poll a second)
const WINDOW_S = 60;      // histograms are shown over this window
const COLORS = ['#2d6cdf', '#e67e22', '#27ae60', '#8e44ad', '#c0392b', '#16a085', '#7f8c8d'];
const docs = [];          // recent status documents, oldest first
const series = {};        // chart -> {series name -> [value or null]}

function chart(name) { return document.querySelector('canvas[data-chart="' + name + '"]'); }

function push(name, label, value) {
  const lines = series[name] = series[name] || {};
  const line = lines[label] = lines[label] || [];
  line.push(value === undefined || Number.isNaN(value) ? null : value);
  while (line.length > HISTORY) line.shift();
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
  return 10 * step;
}

function fmt(value) {
  if (Number.isInteger(value)) return String(value);
  if (Math.abs(value) >= 100) return value.toFixed(0);
  if (Math.abs(value) >= 1) return value.toFixed(1);
  return value.toPrecision(2);
}

function frame(canvas, top) {
  const g = canvas.getContext('2d');
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.font = '11px system-ui, sans-serif';
  g.fillStyle = '#667';
  g.fillText(fmt(top), 2, 12);
  g.fillText('0', 2, canvas.height - 4);
  g.strokeStyle = '#dde';
  g.beginPath(); g.moveTo(40, canvas.height - 16.5); g.lineTo(canvas.width, canvas.height - 16.5); g.stroke();
  return g;
}

function drawLines(name) {
  const canvas = chart(name);
  const lines = series[name] || {};
  const values = Object.values(lines).flat().filter(v => v !== null);
  const top = niceMax(Math.max(0, ...values));
  const g = frame(canvas, top);
  const width = canvas.width - 44, height = canvas.height - 28;
  let points = 0, legendX = 44;
  Object.entries(lines).forEach(([label, line], i) => {
    const color = COLORS[i % COLORS.length];
    g.strokeStyle = color; g.fillStyle = color; g.lineWidth = 1.5;
    g.beginPath();
    let drawn = 0, pen = false;
    line.forEach((v, k) => {
      if (v === null) { pen = false; return; }
      const x = 42 + width * (HISTORY - line.length + k) / (HISTORY - 1);
      const y = 6 + height * (1 - v / top);
      if (pen) g.lineTo(x, y); else g.moveTo(x, y);
      pen = true; drawn += 1;
    });
    g.stroke();
    const last = line.filter(v => v !== null).pop();
    const text = label + (last === undefined ? '' : ' ' + fmt(last));
    g.fillText(text, legendX, canvas.height - 3);
    legendX += g.measureText(text).width + 14;
    points = Math.max(points, drawn);
  });
  canvas.dataset.points = String(points);
}

function drawBars(name, bounds, counts) {
  const canvas = chart(name);
  const total = counts.reduce((a, b) => a + b, 0);
  const top = niceMax(Math.max(0, ...counts));
  const g = frame(canvas, top);
  const width = (canvas.width - 44) / counts.length, height = canvas.height - 28;
  g.fillStyle = COLORS[0];
  counts.forEach((c, k) => {
    const h = height * c / top;
    g.fillRect(44 + k * width + 1, 6 + height - h, width - 2, h);
  });
  g.fillStyle = '#667';
  counts.forEach((c, k) => {
    const label = k < bounds.length ? '\\u2264' + bounds[k] : '>' + bounds[bounds.length - 1];
    g.fillText(label, 44 + k * width + 2, canvas.height - 3);
  });
  canvas.dataset.points = String(total > 0 ? counts.length : 0);
}

function quantile(counts, bounds, q) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (total <= 0) return null;
  let seen = 0;
  for (let k = 0; k < counts.length; k++) {
    seen += counts[k];
    if (seen >= q * total) return bounds[Math.min(k, bounds.length - 1)];
  }
  return bounds[bounds.length - 1];
}

// Counts since ``base`` (the whole count where the sidecar restarted in between).
function since(now, base, key) {
  const cur = now[key].counts;
  if (!base) return cur;
  const old = base[key].counts;
  const diff = cur.map((c, k) => c - (old[k] || 0));
  return diff.some(d => d < 0) ? cur : diff;
}

function rate(now, before, pick) {
  if (!before) return null;
  const dt = now.time - before.time, delta = pick(now) - pick(before);
  return dt > 0 && delta >= 0 ? delta / dt : null;
}

function show(doc) {
  const sc = doc.sidecar;
  const state = document.getElementById('state');
  state.dataset.state = sc.up ? 'up' : 'down';
  state.textContent = 'sidecar ' + (sc.up ? sc.state : 'down') + (sc.reason ? ': ' + sc.reason : '');
  document.body.dataset.sidecar = sc.up ? 'up' : 'down';
  document.getElementById('facts').textContent = sc.model === undefined ? '' :
    sc.model + ' on ' + sc.device + ', ' + sc.dtype + ', epoch ' + sc.epoch +
    (doc.rings_leased === undefined ? '' : ', ' + doc.rings_leased + ' of ' + doc.rings + ' rings leased');
}

function update(doc) {
  show(doc);
  if (!doc.counters) {   // the sidecar cannot be read: gaps in every line
    for (const name of Object.keys(series)) for (const label of Object.keys(series[name])) push(name, label, null);
    ['throughput', 'queue_depth', 'rings', 'latency', 'models'].forEach(drawLines);
    return;
  }
  const withCounts = docs.filter(d => d.counters);
  const before = withCounts[withCounts.length - 1];
  const base = withCounts.find(d => d.time >= doc.time - WINDOW_S);
  push('throughput', 'texts/s', rate(doc, before, d => d.counters.texts));
  push('throughput', 'requests/s', rate(doc, before, d => d.counters.requests));
  push('queue_depth', 'slots ready', doc.queue_depth);
  push('rings', 'rings leased', doc.rings_leased);
  push('rings', 'busy slots', doc.busy_slots);
  const queue = since(doc, base, 'queue_seconds'), compute = since(doc, base, 'compute_seconds');
  push('latency', 'queue p50', quantile(queue, doc.queue_seconds.bounds, 0.5));
  push('latency', 'queue p99', quantile(queue, doc.queue_seconds.bounds, 0.99));
  push('latency', 'compute p50', quantile(compute, doc.compute_seconds.bounds, 0.5));
  push('latency', 'compute p99', quantile(compute, doc.compute_seconds.bounds, 0.99));
  for (const model of doc.models) {
    const old = before && before.models.find(m => m.name === model.name);
    const dt = old ? doc.time - before.time : 0;
    push('models', model.name, dt > 0 && model.texts >= old.texts ? (model.texts - old.texts) / dt : null);
  }
  ['throughput', 'queue_depth', 'rings', 'latency', 'models'].forEach(drawLines);
  drawBars('batch_size', doc.batch_size.bounds, since(doc, base, 'batch_size'));
  if (doc.cache) {
    document.getElementById('cache-section').hidden = false;
    let hitRate = null;
    const prev = before && before.cache;
    if (typeof doc.cache.hits === 'number' && typeof doc.cache.misses === 'number') {
      const hits = doc.cache.hits - (prev ? prev.hits : 0), misses = doc.cache.misses - (prev ? prev.misses : 0);
      hitRate = hits >= 0 && misses >= 0 && hits + misses > 0 ? hits / (hits + misses) : null;
    } else if (typeof doc.cache.hit_rate === 'number') {
      hitRate = doc.cache.hit_rate;
    }
    push('cache', 'hit rate', hitRate);
    drawLines('cache');
  }
  docs.push(doc);
  while (docs.length && docs[0].time < doc.time - WINDOW_S - 5) docs.shift();
}

function note(text) { document.getElementById('note').textContent = text; }

async function poll() {
  let answer;
  try {
    answer = await fetch('status.json', {cache: 'no-store', credentials: 'same-origin'});
  } catch (err) {
    note('no answer from the service');
    document.getElementById('state').dataset.state = 'unknown';
    return;
  }
  if (!answer.ok) {
    note(answer.status === 401 ? 'status.json: not authorized (the proxy must add the API key)'
                               : 'status.json: HTTP ' + answer.status);
    return;
  }
  note('');
  update(await answer.json());
}

(function loop() { poll().finally(() => setTimeout(loop, 1000)); })();
</script>
</body>
</html>
"""
