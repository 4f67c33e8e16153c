// The dashboard: reads /dashboard.json every 2 s, draws the charts with uPlot and fills the
// tables. No build step; uPlot is vendored in this folder (uPlot.LICENSE).
"use strict";

const POLL_MS = 2000;
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const MARK_COLORS = {"swap": "#2a7", "update": "#48c", "PROMOTE": "#a3c",
                     "ABORT": "#e80"};  // anything else: a refusal
const charts = {};

function $(id) { return document.getElementById(id); }

function text(id, value) {
  $(id).textContent = value === null || value === undefined ? "\u2013" : String(value);
}

function clock(epochS) {
  return new Date(epochS * 1000).toISOString().slice(11, 19);
}

function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "\u2013" : String(value);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fillTable(id, rows, makeRow) {
  const body = $(id).tBodies[0];
  const fresh = document.createElement("tbody");
  for (const r of rows) {
    const tr = document.createElement("tr");
    makeRow(tr, r);
    fresh.appendChild(tr);
  }
  if (!rows.length) {
    const tr = document.createElement("tr");
    cell(tr, "none yet").colSpan = $(id).tHead.rows[0].cells.length;
    fresh.appendChild(tr);
  }
  body.replaceWith(fresh);
}

// Vertical lines at the timeline's swaps, updates and refusals (uPlot's draw hook).
function markersPlugin(getMarks) {
  return {hooks: {draw: [u => {
    const ctx = u.ctx, top = u.bbox.top, height = u.bbox.height;
    const [lo, hi] = [u.scales.x.min, u.scales.x.max];
    ctx.save();
    ctx.lineWidth = 1;
    for (const m of getMarks()) {
      if (m.at < lo || m.at > hi) continue;
      const x = Math.round(u.valToPos(m.at, "x", true)) + 0.5;
      ctx.strokeStyle = MARK_COLORS[m.kind] || "#c33";
      ctx.setLineDash(m.kind === "update" ? [2, 3] : m.kind === "ABORT" ? [6, 3] : []);
      ctx.lineWidth = m.kind === "PROMOTE" || m.kind === "ABORT" ? 2 : 1;
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, top + height);
      ctx.stroke();
    }
    ctx.restore();
  }]}};
}

let timelineMarks = [];

// Draws (or redraws when its series changed) a time chart: t, and one array per name.
function plot(id, t, named, opts) {
  const names = Object.keys(named);
  const key = names.join("\u0000");
  const data = [t, ...names.map(n => named[n])];
  const el = $(id);
  const width = Math.max(320, el.clientWidth || 560);
  let chart = charts[id];
  if (chart && chart.key === key) {
    chart.plot.setData(data);
    padX(chart.plot, t, opts.xPad);
    return;
  }
  if (chart) chart.plot.destroy();
  const series = [{}].concat(names.map((n, i) => ({
    label: n, stroke: opts.colors && opts.colors[n] || COLORS[i % COLORS.length],
    width: opts.widths && opts.widths[n] || 1.5, spanGaps: false,
    dash: opts.dashed && opts.dashed[n] ? [6, 4] : undefined,
    points: {show: opts.points || false},
  })));
  const scales = {x: {time: true}};
  if (opts.fromZero) scales.y = {range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1]};
  const plot = new uPlot({
    width: width, height: 240, series: series, scales: scales,
    axes: [{}, {label: opts.yLabel, size: 60}],
    plugins: opts.marks ? [markersPlugin(() => timelineMarks)] : [],
  }, data, el);
  charts[id] = {key: key, plot: plot};
  padX(plot, t, opts.xPad);
}

// Widens the x range by `pad` seconds each side (one window alone would span a day).
function padX(plot, t, pad) {
  if (pad && t.length) plot.setScale("x", {min: t[0] - pad, max: t[t.length - 1] + pad});
}

function render(d) {
  const m = d.models || {};
  const reachable = d.workers.filter(w => w.reachable);
  text("model-name", m.model);
  text("active-version", m.active);
  text("update-seq", m.update_seq);
  text("updates-applied", m.updates_applied);
  text("refusals", m.refusals);
  text("pinned", m.pinned);
  text("worker-count", reachable.length + " of " + d.workers.length + " answering");
  const total = d.predictions_per_s.total;
  text("rate-total", total.length ? total[total.length - 1] : null);
  $("status").textContent = (m.active ? "serving " + m.active : "no model loaded yet") +
    " \u00b7 asked " + d.worker + " at " + clock(d.generated_at) + " UTC";
  const lastRefusal = m.last_refusal;
  $("error").hidden = !lastRefusal;
  if (lastRefusal) {
    $("error").textContent = "last refusal: " + lastRefusal.version + " (" +
      lastRefusal.kind + "): " + (lastRefusal.reason || "");
  }

  const decisions = d.rollout ? d.rollout.decisions : [];
  timelineMarks = d.timeline.concat(decisions.filter(x => x.at).map(
    x => ({at: x.at / 1000, kind: x.type})));
  const rate = d.predictions_per_s;
  plot("chart-rate", rate.t, Object.assign({}, rate.series, {"all workers": rate.total}),
       {yLabel: "predictions/s", widths: {"all workers": 2}, colors: {"all workers": "#222"},
        dashed: {"all workers": true}, fromZero: true});

  const lat = d.latency, latSeries = {}, latColors = {}, latDashed = {};
  Object.keys(lat.p50).forEach((url, i) => {
    const color = COLORS[i % COLORS.length];
    latSeries[url + " p50"] = lat.p50[url];
    latSeries[url + " p99"] = lat.p99[url];
    latColors[url + " p50"] = latColors[url + " p99"] = color;
    latDashed[url + " p99"] = true;
  });
  plot("chart-latency", lat.t, latSeries, {yLabel: "ms", colors: latColors,
                                          dashed: latDashed, fromZero: true});
  const me = d.workers[0] || {};
  text("latency-now", me.latency_p50_ms === null || me.latency_p50_ms === undefined ? null
       : me.latency_p50_ms + " / " + me.latency_p99_ms);

  const mix = d.class_mix;
  plot("chart-classes", mix.t, mix.series, {yLabel: "predictions", points: true,
                                           fromZero: true, xPad: mix.window_s || 60});
  if (mix.window_s) {
    $("classes-note").textContent = "Predictions per class in " + mix.window_s +
      "-second windows (table class_counts), the last hour.";
  }

  const q = d.quality;
  $("quality-figure").textContent = q.figure.replace(/_/g, " ");
  plot("chart-quality", q.t, q.series, {yLabel: q.figure.replace(/_/g, " "), marks: true,
                                        points: true});

  renderRollout(d.rollout);

  fillTable("workers", d.workers, (tr, w) => {
    if (!w.reachable) tr.className = "unreachable";
    cell(tr, w.url + (w.self ? " (this one)" : ""));
    cell(tr, w.reachable ? (w.keeps_summaries ? "serving, keeps the summaries" : "serving")
                         : "unreachable: " + (w.error || ""));
    cell(tr, w.active);
    cell(tr, w.update_seq, "num");
    cell(tr, w.predictions_per_s, "num");
    cell(tr, w.scored, "num");
    cell(tr, w.latency_p50_ms, "num");
    cell(tr, w.latency_p99_ms, "num");
  });
  fillTable("timeline", d.timeline, (tr, r) => {
    tr.className = MARK_COLORS[r.kind] ? r.kind : "refused";
    cell(tr, clock(r.at));
    cell(tr, r.kind);
    cell(tr, r.version);
    cell(tr, r.reason || (r.load_s !== undefined ? "loaded in " + r.load_s + " s" : ""));
  });
  fillTable("latest", d.latest, (tr, p) => {
    cell(tr, p.id);
    cell(tr, typeof p.predicted === "number" ? p.predicted.toPrecision(6) : p.predicted);
    cell(tr, (p.probabilities || []).map(x => x.toFixed(3)).join(", "));
    cell(tr, p.model_version);
    cell(tr, clock((p.ts || 0) / 1000));
    cell(tr, p.worker);
  });
  document.body.dataset.rendered = String(d.generated_at);
}

function figures(f) {
  return Object.keys(f || {}).map(k => k + " " + (typeof f[k] === "number" ?
    +f[k].toPrecision(4) : JSON.stringify(f[k]))).join(", ");
}

function renderRollout(r) {
  $("rollout-none").hidden = !!r;
  $("rollout-body").hidden = !r;
  if (!r) return;
  text("rollout-candidate", r.candidate ? r.candidate + " (serving: " + r.serving + ")"
                                        : "none now (the rollout ended)");
  text("rollout-mode", r.mode ? r.mode + (r.mode === "canary" ? " / " + r.share : "") : null);
  text("rollout-since", r.since_ms ? clock(r.since_ms / 1000) + " (offset " + r.since + ")"
                                   : r.since);
  text("rollout-loaded", r.candidate ? (r.loaded ? "yes" : "no") : null);
  const v = r.comparison.verdict;
  text("rollout-verdict", !r.candidate ? null : v.ahead === null ? "no figures yet" :
       (v.ahead === "even" ? "even" : v.ahead + " ahead") + ": candidate " + v.candidate +
       " (n " + v.candidate_n + ") vs serving " + v.serving + " (n " + v.serving_n + ")");
  const last = r.decision;
  text("rollout-decision", last ? last.type + " " + last.version + " by " + last.by +
       (last.reason ? ": " + last.reason : "") : null);
  const fig = (v.figure || "rolling_accuracy").replace(/_/g, " ");
  $("rollout-figure").textContent = fig;
  const c = r.comparison, named = {};
  for (const version of Object.keys(c.series)) {
    named[version + (version === r.candidate ? " (candidate)" : " (serving)")] =
      c.series[version];
  }
  plot("chart-rollout", c.t, named, {yLabel: fig, marks: true, points: true,
                                     dashed: {[r.candidate + " (candidate)"]: true}});
  fillTable("decisions", r.decisions, (tr, x) => {
    tr.className = x.type === "PROMOTE" ? "promote" : "abort";
    cell(tr, x.at ? clock(x.at / 1000) : null);
    cell(tr, x.type);
    cell(tr, x.version);
    cell(tr, x.by);
    cell(tr, x.reason);
    cell(tr, figures(x.figures));
  });
}

async function poll() {
  try {
    const response = await fetch("/dashboard.json", {cache: "no-store"});
    if (!response.ok) throw new Error("/dashboard.json answered " + response.status);
    render(await response.json());
  } catch (err) {
    $("status").textContent = "cannot read /dashboard.json: " + err.message;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
