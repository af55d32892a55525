// The slmops fleet console: each page polls the fleet's JSON API (/v1, with the session cookie)
// and redraws. No framework, no build step; plots are uPlot (vendored beside this file).
"use strict";

(function () {
  const app = document.getElementById("app");
  const errorBox = document.getElementById("error");
  const page = app.dataset.page;
  const parts = location.pathname.split("/").filter(Boolean); // ["ui", "devices", "<id>"]
  const ref = parts.length > 2 ? decodeURIComponent(parts[2]) : "";

  // The target states after which a device is done with a rollout (rollouts/states.py).
  const FINAL = new Set(["COMMITTED", "ROLLED_BACK", "SUPERSEDED", "TIMED_OUT", "ABORTED", "CANCELLED", "NO_VARIANT"]);

  // --- helpers ------------------------------------------------------------------------------

  function esc(value) {
    return String(value === null || value === undefined ? "" : value).replace(/[&<>"']/g, (c) => ({
      "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
    })[c]);
  }

  async function api(path) {
    const r = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (r.status === 401) {
      location.assign("/ui/login");
      throw new Error("signed out");
    }
    const body = await r.json();
    if (!r.ok) throw new Error(body.detail || r.statusText);
    return body;
  }

  function showError(err) {
    errorBox.textContent = err ? String(err.message || err) : "";
    errorBox.hidden = !err;
  }

  // Run `tick` now and every `ms`, never two at once.
  function poll(tick, ms) {
    let busy = false;
    const run = async () => {
      if (busy) return;
      busy = true;
      try {
        await tick();
        showError(null);
      } catch (err) {
        showError(err);
      } finally {
        busy = false;
      }
    };
    run();
    setInterval(run, ms);
  }

  function bytes(n) {
    if (!n) return "0 B";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  function ago(iso) {
    if (!iso) return "never";
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  }

  function short(id) { return id ? String(id).slice(0, 12) : ""; }

  function table(headers, rows, cls) {
    const head = headers.map((h) => `<th>${esc(h)}</th>`).join("");
    const body = rows.length
      ? rows.map((cells) => `<tr>${cells.map((c) => `<td>${c}</td>`).join("")}</tr>`).join("")
      : `<tr><td colspan="${headers.length}" class="empty">none yet</td></tr>`;
    return `<table class="${cls || ""}"><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
  }

  // A device's named groups, each a link to the groups page; the assigned group whose release it
  // follows is marked.
  function groupsOf(d) {
    return (d.groups || []).map((g) => {
      const follows = g === d.follows_group;
      return `<a href="/ui/groups#group-${encodeURIComponent(g)}"${follows ? ' class="follows" title="follows this group\'s release"' : ""}>${esc(g)}</a>`;
    }).join(", ");
  }

  function bar(done, total) {
    const pct = total ? Math.round((100 * done) / total) : 0;
    return `<span class="bar" title="${done}/${total}"><span style="width:${pct}%"></span></span> ${done}/${total}`;
  }

  // A time plot of one series; `update(xs, ys)` redraws it.
  function timePlot(el, label, color) {
    const opts = {
      width: Math.max(280, el.clientWidth || 420),
      height: 180,
      title: label,
      scales: { x: { time: true } },
      series: [{}, { label, stroke: color, width: 2, fill: color + "22", spanGaps: true }],
      axes: [{}, { size: 60 }],
      legend: { show: false },
    };
    const plot = new uPlot(opts, [[], []], el);
    return {
      plot,
      update(xs, ys) { plot.setData([xs, ys]); },
    };
  }

  const METRICS = [
    ["tokens_per_s", "tokens/s", "#2a7ae2", (v) => v],
    ["ttft_ms", "time to first token (ms)", "#d9822b", (v) => v],
    ["requests_total", "requests (total)", "#0f9960", (v) => v],
    ["errors_total", "errors (total)", "#db3737", (v) => v],
    ["memory_used_bytes", "memory used (MB)", "#7157d9", (v) => v / 1e6],
    ["cpu_percent", "CPU (%)", "#5c7080", (v) => v],
  ];

  function plotGrid(container, metrics) {
    container.innerHTML = metrics.map(([key]) => `<div class="plot" data-metric="${key}"></div>`).join("");
    return metrics.map(([key, label, color, scale]) => ({
      key, scale, p: timePlot(container.querySelector(`[data-metric="${key}"]`), label, color),
    }));
  }

  function drawSeries(plots, points) {
    const xs = points.map((p) => p.t / 1000);
    for (const { key, scale, p } of plots) p.update(xs, points.map((pt) => scale(pt[key])));
    app.dataset.points = String(points.length);
  }

  // --- pages --------------------------------------------------------------------------------

  const pages = {
    devices() {
      app.innerHTML = '<h1>Devices <span id="count" class="muted"></span></h1><div id="devices"></div>';
      poll(async () => {
        const [devices, latest] = await Promise.all([api("/v1/devices"), api("/v1/telemetry/latest")]);
        const now = latest.devices;
        const rows = devices.devices.map((d) => {
          const t = now[d.id];
          const mem = t ? `${bytes(t.memory_used_bytes)} / ${bytes(t.memory_total_bytes)}` : "";
          return [
            `<a href="/ui/devices/${encodeURIComponent(d.id)}">${esc(d.name || short(d.id))}</a>`,
            `<span class="state s-${esc(d.status === "revoked" ? "revoked" : d.state)}">${esc(d.status === "revoked" ? "revoked" : d.state || "NEW")}</span>`,
            esc(d.active_version || ""),
            groupsOf(d),
            esc((d.tags || []).join(", ")),
            esc(ago(d.last_seen)),
            esc(mem),
            t ? t.tokens_per_s.toFixed(1) : "",
          ];
        });
        document.getElementById("devices").innerHTML = table(
          ["device", "state", "active version", "groups", "tags", "last seen", "memory", "tokens/s"], rows, "devices");
        document.getElementById("count").textContent = `${rows.length}`;
        app.dataset.devices = String(rows.length);
      }, 2000);
    },

    device() {
      app.innerHTML = '<h1>Device <span id="name"></span></h1><div id="info"></div>' +
        '<h2>Telemetry, last 15 minutes</h2><div id="plots" class="plots"></div>';
      const plots = plotGrid(document.getElementById("plots"), METRICS);
      const id = encodeURIComponent(ref);
      poll(async () => {
        const [d, series] = await Promise.all([
          api(`/v1/devices/${id}`),
          api(`/v1/telemetry/series?device_id=${id}&since_s=900&points=180`),
        ]);
        document.getElementById("name").textContent = d.name || d.id;
        const inv = d.inventory || {};
        document.getElementById("info").innerHTML = table(["", ""], [
          ["id", esc(d.id)],
          ["state", esc(d.status === "revoked" ? "revoked" : d.state || "NEW") + (d.reason ? ` — ${esc(d.reason)}` : "")],
          ["active", d.active_package_id
            ? `${esc(d.active_version || "")} <code>${esc(short(d.active_package_id))}</code> slot ${esc(d.active_slot || "?")}`
            : "none"],
          ["target", d.target_package_id
            ? `<code>${esc(short(d.target_package_id))}</code> ${bytes(d.bytes_received)} of ${bytes(d.bytes_needed)} received`
            : "none"],
          ["groups", groupsOf(d) || "none"],
          ["follows", d.follows_group ? `the release assigned to ${esc(d.follows_group)}` : "no assigned group"],
          ["tags", esc((d.tags || []).join(", ")) || "none"],
          ["last seen", esc(ago(d.last_seen))],
          ["hardware", esc(`${inv.os || ""} ${inv.arch || ""}, ${inv.cpu_count || 0} CPUs, ${bytes(inv.memory_bytes)} memory`)],
        ], "info");
        drawSeries(plots, series.points);
      }, 2000);
    },

    rollouts() {
      app.innerHTML = "<h1>Rollouts</h1><div id=\"rollouts\"></div>";
      poll(async () => {
        const body = await api("/v1/rollouts");
        const rows = body.rollouts.slice().reverse().map((r) => {
          const done = Object.entries(r.counts).filter(([s]) => s === "COMMITTED").reduce((a, [, n]) => a + n, 0);
          return [
            `<a href="/ui/rollouts/${encodeURIComponent(r.id)}">${esc(short(r.id))}</a>`,
            esc(r.release || `${r.package_name} ${r.package_version}`),
            `<span class="state s-${esc(r.state)}">${esc(r.state)}</span>`,
            esc(`${Math.min(r.current_wave + 1, r.waves.length)} of ${r.waves.length}`),
            bar(done, r.devices.length),
            esc(ago(r.created_at)),
          ];
        });
        document.getElementById("rollouts").innerHTML = table(
          ["rollout", "release / package", "state", "wave", "committed", "created"], rows);
      }, 2000);
    },

    rollout() {
      app.innerHTML = '<h1>Rollout <span id="rid"></span></h1><div id="summary"></div>' +
        '<h2>Waves</h2><div id="waves"></div><h2>Devices</h2><div id="targets"></div>' +
        '<h2>History</h2><div id="history"></div>';
      const id = encodeURIComponent(ref);
      poll(async () => {
        const r = await api(`/v1/rollouts/${id}`);
        document.getElementById("rid").textContent = short(r.id);
        document.getElementById("summary").innerHTML = table(["", ""], [
          ["release / package", esc(r.release || `${r.package_name} ${r.package_version}`) + ` <code>${esc(short(r.package_id))}</code>`],
          ["state", `<span class="state s-${esc(r.state)}">${esc(r.state)}</span>` + (r.reason ? ` — ${esc(r.reason)}` : "")],
          ["target", esc(Array.isArray(r.target) ? `${r.target.length} devices` : r.target)],
          ["gates", esc(Object.entries((r.plan || {}).gates || {})
            .filter(([, v]) => v !== null).map(([k, v]) => `${k.replace(/_/g, " ")} ${v}`).join(", ") || "none")],
        ], "info");
        let committed = 0;
        const waves = r.waves.map((w) => {
          const c = w.counts || {};
          const ok = c.COMMITTED || 0;
          committed += ok;
          const finished = Object.entries(c).filter(([s]) => FINAL.has(s)).reduce((a, [, n]) => a + n, 0);
          return [
            esc(w.index + 1),
            esc(w.size),
            `<span class="state s-${esc(w.state)}">${esc(w.state)}</span>`,
            bar(ok, w.size),
            esc(`${finished} finished`),
            esc(w.reason || (w.state === "passed" ? "gates passed" : "")),
          ];
        });
        document.getElementById("waves").innerHTML = table(
          ["wave", "devices", "state", "committed", "progress", "gate verdict"], waves, "waves");
        document.getElementById("targets").innerHTML = table(["device", "wave", "state", "reason", "updated"],
          r.devices.map((t) => [
            `<a href="/ui/devices/${encodeURIComponent(t.device_id)}">${esc(short(t.device_id))}</a>`,
            esc(t.wave + 1), `<span class="state s-${esc(t.state)}">${esc(t.state)}</span>`,
            esc(t.reason || ""), esc(ago(t.updated_at)),
          ]));
        document.getElementById("history").innerHTML = table(["when", "state", "event", "reason"],
          (r.transitions || []).slice().reverse().map((t) => [
            esc(ago(t.at)), esc(t.state), esc(t.event ? `${t.event}${t.wave ? ` (wave ${t.wave})` : ""}` : ""), esc(t.reason),
          ]));
        app.dataset.committed = String(committed);
        app.dataset.state = r.state;
      }, 1000);
    },

    groups() {
      app.innerHTML = '<h1>Groups <span id="count" class="muted"></span></h1><div id="groups"></div>';
      poll(async () => {
        const body = await api("/v1/groups");
        const rows = body.groups.map((g) => {
          const a = g.assignment;
          const state = !a ? "" : a.halted ? "halted" : "applying";
          return [
            `<span id="group-${esc(g.name)}">${esc(g.name)}</span>`,
            esc(g.kind),
            g.kind === "dynamic" ? `<code>${esc(g.selector)}</code>` : esc(`${(g.devices || []).length} listed`),
            esc(g.members.length),
            esc(g.priority),
            a ? esc(a.release || short(a.package_id)) : "none",
            a ? esc(a.following.length) : "",
            a ? `<span class="state s-${state}"${a.halted ? ` title="${esc(a.halted)}"` : ""}>${state}</span>` +
              (a.halted ? ` — ${esc(a.halted)}` : "") : "",
            a ? esc(ago(a.assigned_at)) : "",
          ];
        });
        document.getElementById("groups").innerHTML = table(
          ["group", "kind", "selector / devices", "members", "priority", "assigned release", "following",
            "assignment", "assigned"], rows, "groups");
        document.getElementById("count").textContent = `${rows.length}`;
        app.dataset.groups = String(rows.length);
      }, 2000);
    },

    releases() {
      app.innerHTML = "<h1>Releases</h1><div id=\"releases\"></div>";
      poll(async () => {
        const body = await api("/v1/releases");
        document.getElementById("releases").innerHTML = table(["release", "variants", "created"],
          body.releases.slice().reverse().map((r) => [
            `<a href="/ui/releases/${encodeURIComponent(r.id)}">${esc(r.ref || `${r.name}@${r.version}`)}</a>`,
            esc(r.packages.map((p) => p.profile || p.kind).join(", ")),
            esc(ago(r.created_at)),
          ]));
      }, 5000);
    },

    release() {
      app.innerHTML = '<h1>Release <span id="rel"></span></h1><div id="variants"></div><div id="lineage"></div>';
      const id = encodeURIComponent(ref);
      poll(async () => {
        const r = await api(`/v1/releases/${id}`);
        document.getElementById("rel").textContent = r.ref || `${r.name}@${r.version}`;
        document.getElementById("variants").innerHTML = "<h2>Variants</h2>" + table(
          ["package", "profile", "kind", "provider", "precision", "min memory", "size"],
          r.packages.map((p) => [
            `<code>${esc(short(p.id))}</code>`, esc(p.profile), esc(p.kind), esc(p.provider), esc(p.precision),
            esc(p.min_memory_bytes ? bytes(p.min_memory_bytes) : "any"), esc(bytes(p.size_bytes)),
          ]));
        document.getElementById("lineage").innerHTML = r.packages.map((p) => {
          const l = p.lineage || {};
          const metrics = Object.entries((p.evaluation || {}).metrics || {})
            .map(([k, v]) => `${esc(k)} ${esc(typeof v === "number" ? +v.toFixed(3) : v)}`).join(", ");
          return `<h2>Lineage of ${esc(p.profile || short(p.id))}</h2>` + table(["", ""], [
            ["base model", esc(l.base_model || "") + (l.base_model_sha256 ? ` <code>${esc(short(l.base_model_sha256))}</code>` : "")],
            ["training data", (l.dataset_sha256 || []).map((h) => `<code>${esc(short(h))}</code>`).join(" ") || "none"],
            ["teacher", esc(l.teacher || "none")],
            ["recipe", `<code>${esc(short(l.recipe_sha256))}</code>`],
            ["engine", esc(`${l.engine || ""} ${l.quantization_method || ""}`)],
            ["profile", esc(p.profile)],
            ["quality (builder)", metrics || "none reported"],
          ], "info");
        }).join("");
      }, 5000);
    },

    fleet() {
      app.innerHTML = '<h1>Fleet</h1><div id="counts"></div><h2>Telemetry of every device, last hour</h2>' +
        '<div id="plots" class="plots"></div>';
      const plots = plotGrid(document.getElementById("plots"), [
        ["tokens_per_s", "tokens/s (mean per device)", "#2a7ae2", (v) => v],
        ["ttft_ms", "time to first token (ms, mean)", "#d9822b", (v) => v],
        ["devices", "devices reporting", "#0f9960", (v) => v],
        ["samples", "samples", "#5c7080", (v) => v],
        ["memory_used_bytes", "memory used (MB, mean)", "#7157d9", (v) => v / 1e6],
        ["cpu_percent", "CPU (%, mean)", "#db3737", (v) => v],
      ]);
      poll(async () => {
        const [status, series] = await Promise.all([
          api("/v1/status"), api("/v1/telemetry/series?since_s=3600&points=240"),
        ]);
        const states = Object.entries(status.devices_by_state || {}).map(([s, n]) => `${esc(s)} ${esc(n)}`).join(", ");
        const rollouts = Object.entries(status.rollouts_by_state || {}).map(([s, n]) => `${esc(s)} ${esc(n)}`).join(", ");
        document.getElementById("counts").innerHTML = table(["", ""], [
          ["devices", `${esc(status.devices)} (${states})`],
          ["rollouts", `${esc(status.rollouts)} (${rollouts})`],
          ["packages", esc(status.packages)],
          ["telemetry samples", esc(status.telemetry_samples)],
        ], "info");
        drawSeries(plots, series.points);
      }, 2000);
    },
  };

  (pages[page] || pages.devices)();
})();
