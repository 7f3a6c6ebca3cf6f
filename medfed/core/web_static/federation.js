/* medfed dashboards: poll the page's JSON endpoint, swap its server-rendered parts in
 * place, and draw one run's per-round charts with uPlot (vendored beside this file).
 * No build step, no request to anything but this server. */
(function () {
  "use strict";
  var body = document.body;
  var url = body.dataset.poll;
  var every = parseFloat(body.dataset.every || "2") * 1000;
  var palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                 "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  var charts = {};

  function swap(html) {
    Object.keys(html || {}).forEach(function (id) {
      var el = document.getElementById(id);
      if (el && el.innerHTML !== html[id]) { el.innerHTML = html[id]; }
    });
  }

  // {site: [[round, value], ...]} -> uPlot's columns: rounds, then one array per site
  function columns(bySite) {
    var sites = Object.keys(bySite).sort();
    var rounds = {};
    sites.forEach(function (s) { bySite[s].forEach(function (p) { rounds[p[0]] = true; }); });
    var xs = Object.keys(rounds).map(Number).sort(function (a, b) { return a - b; });
    var data = [xs];
    sites.forEach(function (s) {
      var at = {};
      bySite[s].forEach(function (p) { at[p[0]] = p[1]; });
      data.push(xs.map(function (x) { return x in at ? at[x] : null; }));
    });
    return { sites: sites, data: data };
  }

  function chart(key, title, bySite, parent) {
    if (typeof uPlot === "undefined") { return; }
    var c = columns(bySite);
    var sig = c.sites.join(",");
    var known = charts[key];
    if (known && known.sig === sig) { known.plot.setData(c.data); return; }
    if (known) { known.plot.destroy(); known.box.remove(); }
    var box = document.createElement("div");
    box.className = "chart";
    box.dataset.chart = key;
    parent.appendChild(box);
    var opts = {
      title: title, width: 460, height: 220,
      scales: { x: { time: false } },
      axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500] }, {}],
      series: [{ label: "round" }].concat(c.sites.map(function (s, i) {
        return { label: s, stroke: palette[i % palette.length], width: 2, spanGaps: true };
      }))
    };
    charts[key] = { sig: sig, box: box, plot: new uPlot(opts, c.data, box) };
  }

  function esc(text) {
    var d = document.createElement("div");
    d.textContent = String(text);
    return d.innerHTML;
  }

  function details(d) {
    var area = document.getElementById("charts");
    Object.keys(d.metrics || {}).sort().forEach(function (phase) {
      Object.keys(d.metrics[phase]).sort().forEach(function (name) {
        chart(phase + "/" + name, phase + ": " + name, d.metrics[phase][name], area);
      });
    });
    var eps = d.epsilon || {};
    var sites = Object.keys(eps).sort();
    if (sites.length) {
      var box = document.getElementById("epsilon");
      if (!box.querySelector("table")) { box.innerHTML = "<div id=eps-chart></div><table></table>"; }
      chart("epsilon", "epsilon spent in this run", eps, document.getElementById("eps-chart"));
      var c = columns(eps);
      var rows = "<thead><tr><th>round</th>" + c.sites.map(function (s) {
        return "<th>" + esc(s) + "</th>";
      }).join("") + "</tr></thead><tbody>";
      c.data[0].forEach(function (r, i) {
        rows += "<tr><td>" + r + "</td>" + c.sites.map(function (_, j) {
          var v = c.data[j + 1][i];
          return "<td>" + (v === null ? "-" : Number(v).toPrecision(4)) + "</td>";
        }).join("") + "</tr>";
      });
      box.querySelector("table").innerHTML = rows + "</tbody>";
    }
    var sec = document.getElementById("secagg");
    if (sec && d.secagg) {
      sec.innerHTML = d.secagg.length ? "<table><thead><tr><th>round</th><th>survivors</th>" +
        "<th>dropped</th></tr></thead><tbody>" + d.secagg.map(function (r) {
          return "<tr><td>" + r[0] + "</td><td>" + esc(r[1].join(", ")) + "</td><td>" +
            esc(r[2].join(", ") || "-") + "</td></tr>";
        }).join("") + "</tbody></table>" : "<p class=dim>no secure-aggregation round yet</p>";
    }
  }

  function tick() {
    fetch(url, { cache: "no-store", credentials: "same-origin" }).then(function (r) {
      if (!r.ok) { body.dataset.state = "http " + r.status; return null; }
      return r.json();
    }).then(function (j) {
      if (!j) { return; }
      swap(j.html);
      var up = document.getElementById("updated");
      if (up) { up.textContent = j.updated; }
      if (j.details) { details(j.details); }
      body.dataset.state = "ok";
    }).catch(function () {
      body.dataset.state = "unreachable";
    }).then(function () { setTimeout(tick, every); });
  }

  if (url) { tick(); }
})();
