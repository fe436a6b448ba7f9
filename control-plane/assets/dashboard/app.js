// AEX dashboard: polls /dashboard/api/state every 2 s and updates the page in place.
// Plain JS, no dependencies, no requests to anything but this origin.
(function () {
  "use strict";

  var API = "/dashboard/api/state";
  var POLL_MS = 2000;
  var HIDDEN_POLL_MS = 10000;
  var SVGNS = "http://www.w3.org/2000/svg";

  // ------------------------------------------------------------------ formatting

  function groupThousands(n) {
    return String(n).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  }

  /**
   * Integer micro-USD to a dollar string, integer arithmetic only.
   *   < $1: exact to the micro-dollar, trailing zeros trimmed (min. 2 decimals): 30 -> $0.00003
   *   >= $1: rounded half-up to 4 decimals, trimmed the same way: 1234567 -> $1.2346, 5000000 -> $5.00
   */
  function fmtUsd(micros) {
    if (typeof micros !== "number" || !isFinite(micros)) return "—";
    var neg = micros < 0;
    var m = Math.abs(Math.round(micros));
    var whole, frac;
    if (m >= 1000000) {
      var r = Math.floor((m + 50) / 100); // 1/10000 dollars
      whole = Math.floor(r / 10000);
      frac = String(r % 10000);
      while (frac.length < 4) frac = "0" + frac;
    } else {
      whole = 0;
      frac = String(m);
      while (frac.length < 6) frac = "0" + frac;
    }
    frac = frac.replace(/0+$/, "");
    while (frac.length < 2) frac += "0";
    return (neg ? "-" : "") + "$" + groupThousands(whole) + "." + frac;
  }

  /** Exact six-decimal form for tooltips. */
  function exactUsd(micros) {
    var m = Math.abs(Math.round(micros));
    var f = String(m % 1000000);
    while (f.length < 6) f = "0" + f;
    return (micros < 0 ? "-" : "") + "$" + groupThousands(Math.floor(m / 1000000)) + "." + f;
  }

  function fmtInt(n) {
    return typeof n === "number" ? groupThousands(Math.round(n)) : "—";
  }

  /** Seconds to a short human duration: 45s, 12m, 3h 20m, 4d 6h, > 1 year. */
  function humanDuration(secs) {
    if (secs === null || secs === undefined) return "—";
    var s = Math.max(0, Math.floor(secs));
    if (s < 60) return s + "s";
    var m = Math.floor(s / 60);
    if (m < 60) return m + "m";
    var h = Math.floor(m / 60);
    if (h < 24) return h + "h" + (m % 60 ? " " + (m % 60) + "m" : "");
    var d = Math.floor(h / 24);
    if (d < 365) return d + "d" + (h % 24 ? " " + (h % 24) + "h" : "");
    return "> 1 year";
  }

  function pct(part, whole) {
    if (!whole) return 0;
    return (part / whole) * 100;
  }

  function fmtPct(p) {
    if (p === 0) return "0%";
    if (p < 0.1) return "<0.1%";
    if (p < 10) return p.toFixed(1) + "%";
    return Math.round(p) + "%";
  }

  function pad2(n) {
    return (n < 10 ? "0" : "") + n;
  }

  function clock(ms, withSeconds) {
    var d = new Date(ms);
    var s = pad2(d.getHours()) + ":" + pad2(d.getMinutes());
    return withSeconds ? s + ":" + pad2(d.getSeconds()) : s;
  }

  function eventTime(ms) {
    var d = new Date(ms);
    var now = new Date();
    var t = clock(ms, true);
    if (d.toDateString() === now.toDateString()) return t;
    return d.getFullYear() + "-" + pad2(d.getMonth() + 1) + "-" + pad2(d.getDate()) + " " + t;
  }

  function fmtValue(key, v) {
    if (typeof v === "number") {
      if (/_micros$/.test(key)) return fmtUsd(v);
      if (/_secs$/.test(key)) return v === 0 ? "none" : humanDuration(v);
      if (/_at$|_ms$/.test(key) && v > 1e11) return eventTime(v);
      if (/_at$/.test(key) && v > 1e9) return eventTime(v * 1000);
      if (/_at$/.test(key) && v === 0) return "never";
      return fmtInt(v);
    }
    if (v === null) return "none";
    if (Array.isArray(v)) {
      // [before, after] pairs of agent.updated.
      if (v.length === 2 && typeof v[0] !== "object" && typeof v[1] !== "object") {
        return v[0] === v[1] ? fmtValue(key, v[0]) : fmtValue(key, v[0]) + " → " + fmtValue(key, v[1]);
      }
      return v.map(function (x) { return typeof x === "object" ? JSON.stringify(x) : fmtValue(key, x); }).join(", ") || "none";
    }
    if (typeof v === "object") return null;
    return String(v);
  }

  /** Top-level scalar fields of a (possibly truncated) JSON object: [[key, value], ...]. */
  function scalarFields(text) {
    var out = [];
    var re = /"([A-Za-z0-9_]+)":("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|true|false|null|\[[^\[\]{}]*\]|\{)/g;
    var depth = 0, last = 0, m;
    while ((m = re.exec(text))) {
      // Depth of this key: count braces between the previous match and this one.
      var between = text.slice(last, m.index);
      depth += (between.match(/\{/g) || []).length - (between.match(/\}/g) || []).length;
      last = m.index + m[0].length;
      if (m[2] === "{") {
        depth++;
        continue;
      }
      if (depth !== 1) continue;
      try {
        out.push([m[1], JSON.parse(m[2])]);
      } catch (e) {
        /* truncated value */
      }
    }
    return out;
  }

  var LABELS = { budget_micros: "budget", ttl_secs: "token TTL", rpm: "rpm" };

  /**
   * Server summaries carry raw "N µUSD" amounts; show them as dollars like the rest of the page.
   * Events without a dedicated summary (agent.*, token.*, config.*) carry their JSON payload: show
   * its top-level fields as "key value" pairs instead.
   */
  function prettySummary(kind, s) {
    s = String(s || "");
    if (s.charAt(0) === "{") {
      var parts = [];
      scalarFields(s).forEach(function (kv) {
        if (kv[0] === "name") return; // the agent column already says it
        var v = fmtValue(kv[0], kv[1]);
        if (v === null || v === "") return;
        parts.push((LABELS[kv[0]] || kv[0].replace(/_micros$/, "").replace(/_/g, " ")) + " " + v);
      });
      if (parts.length) return parts.join(" · ");
    }
    return s.replace(/(\d+) µUSD/g, function (_, n) {
      return fmtUsd(Number(n));
    });
  }

  // ------------------------------------------------------------------ DOM helpers

  function $(id) {
    return document.getElementById(id);
  }

  function h(tag, attrs, children) {
    var e = document.createElement(tag);
    if (attrs) {
      for (var k in attrs) {
        if (!Object.prototype.hasOwnProperty.call(attrs, k)) continue;
        var v = attrs[k];
        if (v === null || v === undefined || v === false) continue;
        if (k === "class") e.className = v;
        else if (k === "text") e.textContent = v;
        else e.setAttribute(k, v === true ? "" : v);
      }
    }
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return e;
  }

  function s(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs) {
      if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, attrs[k]);
    }
    return e;
  }

  /** Sets text only when it changed; optionally flashes the element so changes catch the eye. */
  function setText(e, text, flash) {
    if (!e) return;
    text = String(text);
    if (e.textContent === text) return;
    var had = e.textContent !== "" && e.textContent !== "—";
    e.textContent = text;
    if (flash && had) {
      e.classList.remove("flash");
      void e.offsetWidth; // restart the animation
      e.classList.add("flash");
    }
  }

  function setBar(bar, spent, reserved, budget) {
    var total = Math.max(budget, spent + reserved) || 1;
    var segs = bar.children;
    var sp = pct(spent, total);
    var rs = pct(reserved, total);
    segs[0].style.width = sp + "%";
    segs[0].classList.toggle("nonzero", spent > 0);
    segs[1].style.width = rs + "%";
    segs[1].classList.toggle("nonzero", reserved > 0);
    var used = pct(spent + reserved, budget || 1);
    bar.classList.toggle("over", spent > budget || used >= 95);
    bar.classList.toggle("high", used >= 80 && used < 95 && spent <= budget);
  }

  // ------------------------------------------------------------------ header totals

  function renderTotals(st) {
    var t = st.totals || {};
    var agents = st.agents || [];
    setText($("total-agents"), fmtInt(t.agents));
    var blocked = agents.filter(function (a) { return a.blocked_overrun; }).length;
    var burning = agents.filter(function (a) { return a.burn_micros_per_hour > 0; }).length;
    var subs = [];
    subs.push(burning + " burning");
    if (blocked) subs.push(blocked + " blocked");
    var inflight = agents.reduce(function (n, a) { return n + (a.open_reservations || 0); }, 0);
    if (inflight) subs.push(inflight + " in flight");
    setText($("total-agents-sub"), subs.join(" · "));

    var budget = t.budget_micros || 0;
    var spent = t.spent_micros || 0;
    var reserved = t.reserved_micros || 0;
    setText($("total-spent"), fmtUsd(spent), true);
    $("total-spent").title = exactUsd(spent);
    setText($("total-budget"), fmtUsd(budget));
    setBar($("total-bar"), spent, reserved, budget);
    // Summed per agent by the server: an overrun agent's excess is not taken from the others.
    var remaining = t.remaining_micros || 0;
    setText(
      $("total-spend-sub"),
      fmtPct(pct(spent, budget)) + " used · " + fmtUsd(reserved) + " reserved · " + fmtUsd(remaining) + " remaining"
    );
    var hour = t.spent_1h_micros || 0;
    setText($("total-spent-1h"), fmtUsd(hour), true);
    $("total-spent-1h").title = exactUsd(hour);
    setText($("total-spent-1h-sub"), hour ? "≈ " + fmtUsd(hour * 24) + " / day at this rate" : "nothing spent");

    setText($("total-requests-1h"), fmtInt(t.requests_1h), true);
    setText($("total-requests-24h"), fmtInt(t.requests_24h));
    setText($("total-denials-1h"), fmtInt(t.denials_1h), true);
    $("total-denials-1h").classList.toggle("danger", (t.denials_1h || 0) > 0);
    setText($("total-denials-24h"), fmtInt(t.denials_24h));
    setText($("total-denial-rate"), t.requests_1h ? fmtPct(pct(t.denials_1h, t.requests_1h)) + " denied" : "no traffic");
  }

  // ------------------------------------------------------------------ agents

  var cards = {}; // name -> { root, fields }

  var FIELD_DEFS = ["spent", "budget", "reserved", "remaining", "used", "burn", "tte", "requests", "denials", "blocked", "inflight", "rpm"];

  function buildCard(name) {
    var f = {};
    function field(tag, key, cls, text) {
      var e = h(tag, { class: cls, "data-field": key, text: text || "" });
      f[key] = e;
      return e;
    }
    function legendItem(kind, label, key) {
      return h("span", { class: "legend-item" }, [
        h("span", { class: "swatch " + kind }),
        label,
        field("strong", key, null, "—"),
      ]);
    }
    function stat(label, key) {
      return h("div", null, [h("dt", { text: label }), field("dd", key, null, "—")]);
    }
    f.bar = h("div", { class: "bar", "data-field": "bar", "aria-hidden": "true" }, [
      h("span", { class: "seg spent" }),
      h("span", { class: "seg reserved" }),
      h("span", { class: "seg remaining" }),
    ]);
    var blocked = field("span", "blocked", "badge danger", "Blocked · overrun");
    blocked.hidden = true;
    blocked.title = "Spending exceeded the budget; new requests are refused until the budget is raised.";
    var inflight = field("span", "inflight", "chip inflight", "");
    inflight.hidden = true;
    var root = h("article", { class: "agent", "data-agent": name }, [
      h("div", { class: "agent-top" }, [
        h("h3", { class: "agent-name", text: name, title: name }),
        blocked,
        inflight,
        field("span", "rpm", "chip", "—"),
      ]),
      h("div", { class: "agent-headline" }, [
        field("span", "spent", "big", "—"),
        h("span", { class: "of" }, ["spent of ", field("span", "budget", null, "—")]),
        field("span", "used", "pct", ""),
      ]),
      f.bar,
      h("div", { class: "legend" }, [
        legendItem("reserved", "Reserved", "reserved"),
        legendItem("remaining", "Remaining", "remaining"),
      ]),
      h("dl", { class: "agent-stats" }, [
        stat("Burn / h", "burn"),
        stat("Exhausts in", "tte"),
        stat("Requests 1h", "requests"),
        stat("Denied 1h", "denials"),
      ]),
    ]);
    return { root: root, f: f, data: null };
  }

  function updateCard(c, a) {
    var f = c.f;
    c.data = a;
    setText(f.spent, fmtUsd(a.spent_micros), true);
    f.spent.title = exactUsd(a.spent_micros);
    setText(f.budget, fmtUsd(a.budget_micros));
    f.budget.title = exactUsd(a.budget_micros);
    setText(f.reserved, fmtUsd(a.reserved_micros), true);
    f.reserved.title = exactUsd(a.reserved_micros);
    setText(f.remaining, fmtUsd(a.remaining_micros), true);
    f.remaining.title = exactUsd(a.remaining_micros);
    setText(f.used, fmtPct(pct(a.spent_micros, a.budget_micros)) + " used");
    setBar(f.bar, a.spent_micros, a.reserved_micros, a.budget_micros);

    setText(f.rpm, fmtInt(a.rpm) + " rpm");
    f.rpm.title = "Rate limit: " + fmtInt(a.rpm) + " requests per minute";
    f.blocked.hidden = !a.blocked_overrun;
    c.root.classList.toggle("blocked", !!a.blocked_overrun);
    var open = a.open_reservations || 0;
    f.inflight.hidden = open === 0;
    setText(f.inflight, open + " in flight");

    var burning = a.burn_micros_per_hour > 0;
    setText(f.burn, burning ? fmtUsd(a.burn_micros_per_hour) : "—");
    f.burn.title = burning ? exactUsd(a.burn_micros_per_hour) + " per hour, from the last hour's spend" : "Nothing spent in the last hour";
    f.burn.classList.toggle("quiet", !burning);

    var tte = a.time_to_exhaustion_secs;
    var tteText = tte === null || tte === undefined ? "—" : a.remaining_micros === 0 ? "exhausted" : humanDuration(tte);
    setText(f.tte, tteText);
    f.tte.classList.toggle("quiet", tte === null || tte === undefined);
    f.tte.classList.toggle("soon", tte !== null && tte !== undefined && tte < 3600);
    f.tte.classList.toggle("later", tte !== null && tte !== undefined && tte >= 3600 && tte < 86400);
    f.tte.title = tte === null || tte === undefined ? "Not burning" : "At the current burn rate";

    setText(f.requests, fmtInt(a.requests_in_window), true);
    f.requests.classList.toggle("quiet", !a.requests_in_window);
    setText(f.denials, fmtInt(a.denials_in_window), true);
    f.denials.classList.toggle("has-denials", a.denials_in_window > 0);
    f.denials.classList.toggle("quiet", !a.denials_in_window);
  }

  var SORTS = {
    name: function (a, b) { return a.name < b.name ? -1 : a.name > b.name ? 1 : 0; },
    spent: function (a, b) { return b.spent_micros - a.spent_micros || SORTS.name(a, b); },
    burn: function (a, b) { return b.burn_micros_per_hour - a.burn_micros_per_hour || SORTS.name(a, b); },
    tte: function (a, b) {
      var x = a.time_to_exhaustion_secs, y = b.time_to_exhaustion_secs;
      x = x === null || x === undefined ? Infinity : x;
      y = y === null || y === undefined ? Infinity : y;
      return x - y || (x === y ? SORTS.name(a, b) : 0);
    },
    used: function (a, b) {
      return pct(b.spent_micros + b.reserved_micros, b.budget_micros) - pct(a.spent_micros + a.reserved_micros, a.budget_micros) || SORTS.name(a, b);
    },
    denials: function (a, b) { return b.denials_in_window - a.denials_in_window || SORTS.name(a, b); },
    // The default: agents an operator must act on first (blocked by an overrun, out of budget,
    // exhausting within the hour, being refused), then by budget used.
    attention: function (a, b) { return attention(a) - attention(b) || SORTS.used(a, b); },
  };

  function attention(a) {
    var tte = a.time_to_exhaustion_secs;
    if (a.blocked_overrun) return 0;
    if (a.remaining_micros === 0) return 1;
    if (tte !== null && tte !== undefined && tte < 3600) return 2;
    if (a.denials_in_window > 0) return 3;
    return 4;
  }

  function renderAgents(st) {
    var agents = (st.agents || []).slice();
    var container = $("agents");
    $("agents-loading").hidden = true;
    setText($("agent-count"), String(agents.length));
    $("empty-state").hidden = agents.length !== 0;
    $("agents-tools").hidden = agents.length < 2;

    var seen = {};
    agents.forEach(function (a) {
      seen[a.name] = true;
      var c = cards[a.name];
      if (!c) {
        c = cards[a.name] = buildCard(a.name);
      }
      updateCard(c, a);
    });
    Object.keys(cards).forEach(function (name) {
      if (!seen[name]) {
        cards[name].root.remove();
        delete cards[name];
      }
    });

    var filter = ($("agent-filter").value || "").trim().toLowerCase();
    var sort = SORTS[$("agent-sort").value] || SORTS.attention;
    agents.sort(sort);
    var shown = 0;
    var prev = null;
    agents.forEach(function (a) {
      var c = cards[a.name];
      var match = !filter || a.name.toLowerCase().indexOf(filter) !== -1;
      c.root.hidden = !match;
      if (match) shown++;
      // Keep DOM order equal to the sort order without re-creating nodes.
      var want = prev ? prev.nextSibling : container.firstChild;
      if (want !== c.root) container.insertBefore(c.root, want);
      prev = c.root;
    });
    $("no-match").hidden = !(agents.length > 0 && shown === 0);
  }

  // ------------------------------------------------------------------ denials by code

  function renderDenials(st) {
    var list = $("denials-by-code");
    var by = st.denials_by_code || {};
    var rows = Object.keys(by).map(function (k) { return { code: k || "unknown", n: by[k] }; });
    rows.sort(function (a, b) { return b.n - a.n || (a.code < b.code ? -1 : 1); });
    var key = JSON.stringify(rows);
    if (list.getAttribute("data-key") === key) return;
    list.setAttribute("data-key", key);
    list.textContent = "";
    if (!rows.length) {
      var ok = h("li", { class: "none", id: "denials-none" });
      ok.innerHTML =
        '<svg width="16" height="16" viewBox="0 0 24 24" aria-hidden="true"><path d="M5 12.5 10 17l9-10" stroke="currentColor" stroke-width="2.2" fill="none" stroke-linecap="round" stroke-linejoin="round"/></svg>';
      ok.appendChild(document.createTextNode("No denials in the last hour"));
      list.appendChild(ok);
      return;
    }
    var max = rows[0].n || 1;
    rows.forEach(function (r) {
      var fill = h("span");
      fill.style.width = Math.max(2, pct(r.n, max)) + "%";
      list.appendChild(
        h("li", { class: "denial-row", "data-code": r.code }, [
          h("span", { class: "denial-code", text: r.code, title: r.code }),
          h("span", { class: "denial-count", text: fmtInt(r.n) }),
          h("div", { class: "denial-bar" }, [fill]),
        ])
      );
    });
  }

  // ------------------------------------------------------------------ timeline chart

  var lastTimeline = null;

  function niceMax(v) {
    if (v <= 4) return 4;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) {
      if (steps[i] * p >= v) return steps[i] * p;
    }
    return 10 * p;
  }

  function renderChart(timeline) {
    lastTimeline = timeline;
    var box = $("timeline-chart");
    var W = Math.max(240, box.clientWidth);
    var H = Math.max(120, box.clientHeight);
    var padL = 34, padR = 8, padT = 8, padB = 22;
    var plotW = W - padL - padR;
    var plotH = H - padT - padB;
    var n = timeline.length || 60;
    var max = 0, totalA = 0, totalD = 0, totalSpend = 0;
    timeline.forEach(function (b) {
      max = Math.max(max, b.allowed + b.denied);
      totalA += b.allowed;
      totalD += b.denied;
      totalSpend += b.spent_micros;
    });
    setText($("legend-allowed"), fmtInt(totalA));
    setText($("legend-denied"), fmtInt(totalD));
    setText($("legend-spend"), fmtUsd(totalSpend));
    var top = niceMax(max);
    var y = function (v) { return padT + plotH - (v / top) * plotH; };
    var slot = plotW / n;
    var bw = Math.max(1, slot - Math.min(3, slot * 0.25));

    var svg = s("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, preserveAspectRatio: "none" });
    var grid = s("g", { class: "grid" });
    var axis = s("g", { class: "axis" });
    [0, 0.5, 1].forEach(function (f) {
      var v = top * f;
      var yy = Math.round(y(v)) + 0.5;
      grid.appendChild(s("line", { x1: padL, x2: W - padR, y1: yy, y2: yy }));
      var t = s("text", { x: padL - 8, y: yy + 4, "text-anchor": "end" });
      t.textContent = fmtInt(v);
      axis.appendChild(t);
    });
    svg.appendChild(grid);

    var hover = s("rect", { class: "hover-col", x: 0, y: padT, width: slot, height: plotH, visibility: "hidden" });
    svg.appendChild(hover);

    var bars = s("g", {});
    timeline.forEach(function (b, i) {
      var x = padL + i * slot + (slot - bw) / 2;
      if (b.allowed > 0) {
        bars.appendChild(s("rect", { class: "allowed", x: x, y: y(b.allowed), width: bw, height: Math.max(1, y(0) - y(b.allowed)), rx: Math.min(2, bw / 2) }));
      }
      if (b.denied > 0) {
        var y0 = y(b.allowed);
        var y1 = y(b.allowed + b.denied);
        bars.appendChild(s("rect", { class: "denied", x: x, y: y1, width: bw, height: Math.max(1, y0 - y1), rx: Math.min(2, bw / 2) }));
      }
    });
    svg.appendChild(bars);

    // Clock labels every 15 minutes (every 30 when narrow), plus "now" at the right edge.
    var every = plotW < 420 ? 30 : 15;
    timeline.forEach(function (b, i) {
      var isLast = i === n - 1;
      var cx = padL + i * slot + slot / 2;
      if (!isLast && (new Date(b.minute_ms).getMinutes() % every !== 0 || cx > W - padR - 44)) return;
      var t = s("text", { x: isLast ? W - padR : cx, y: H - 6, "text-anchor": isLast ? "end" : "middle" });
      t.textContent = isLast ? "now" : clock(b.minute_ms, false);
      axis.appendChild(t);
    });
    svg.appendChild(axis);

    var overlay = s("rect", { x: padL, y: 0, width: plotW, height: H, fill: "transparent" });
    var tip = $("tooltip");
    overlay.addEventListener("mousemove", function (ev) {
      var r = svg.getBoundingClientRect();
      var i = Math.floor(((ev.clientX - r.left) * (W / r.width) - padL) / slot);
      if (i < 0 || i >= n) return;
      var b = timeline[i];
      hover.setAttribute("x", padL + i * slot);
      hover.setAttribute("visibility", "visible");
      tip.textContent = "";
      tip.appendChild(h("div", { class: "tt-title", text: clock(b.minute_ms, false) + " – " + clock(b.minute_ms + 60000, false) }));
      [["Allowed", fmtInt(b.allowed)], ["Denied", fmtInt(b.denied)], ["Spend", fmtUsd(b.spent_micros)]].forEach(function (row) {
        tip.appendChild(h("div", { class: "tt-row" }, [h("span", { text: row[0] }), h("strong", { text: row[1] })]));
      });
      tip.hidden = false;
      var tx = ev.clientX + 14;
      if (tx + 180 > window.innerWidth) tx = ev.clientX - 14 - tip.offsetWidth;
      tip.style.left = tx + "px";
      tip.style.top = ev.clientY + 12 + "px";
    });
    overlay.addEventListener("mouseleave", function () {
      hover.setAttribute("visibility", "hidden");
      tip.hidden = true;
    });
    svg.appendChild(overlay);

    box.textContent = "";
    box.appendChild(svg);
  }

  // ------------------------------------------------------------------ events

  var maxSeq = null;

  var KIND_CLASS = {
    "request.allowed": "ok",
    "request.settled": "accent",
    "request.denied": "danger",
    "reservation.expired": "warn",
    overrun: "danger",
    "agent.created": "violet",
    "agent.updated": "violet",
    "agent.deleted": "warn",
    "token.rotated": "violet",
  };

  var EVENT_FILTERS = {
    all: function () { return true; },
    denials: function (k) { return k === "request.denied"; },
    charges: function (k) { return k === "request.settled" || k === "reservation.expired" || k === "overrun"; },
    requests: function (k) { return k.indexOf("request.") === 0 || k.indexOf("reservation.") === 0 || k === "overrun"; },
    admin: function (k) { return !EVENT_FILTERS.requests(k); },
  };

  function applyEventFilter() {
    var f = EVENT_FILTERS[$("events-filter").value] || EVENT_FILTERS.all;
    var rows = $("events-body").querySelectorAll("tr[data-kind]");
    var shown = 0;
    for (var i = 0; i < rows.length; i++) {
      var ok = f(rows[i].getAttribute("data-kind"));
      rows[i].hidden = !ok;
      if (ok) shown++;
    }
    var none = $("events-none");
    if (none) none.hidden = shown !== 0 || rows.length === 0;
  }

  function renderEvents(st) {
    var events = st.recent_events || [];
    var body = $("events-body");
    var top = events.length ? events[0].seq : 0;
    if (body.getAttribute("data-top") === String(top) && body.childNodes.length) return;
    body.setAttribute("data-top", String(top));
    var prevMax = maxSeq;
    maxSeq = top;
    body.textContent = "";
    if (!events.length) {
      body.appendChild(h("tr", { class: "events-empty" }, [h("td", { colspan: "4", text: "No audit events yet." })]));
      return;
    }
    var none = h("tr", { class: "events-empty", id: "events-none" }, [h("td", { colspan: "4", text: "No recent events of this kind." })]);
    none.hidden = true;
    events.forEach(function (e) {
      var cls = KIND_CLASS[e.kind] || (e.kind.indexOf("denied") !== -1 ? "danger" : "");
      var summary = h("td", { class: "s" }, [prettySummary(e.kind, e.summary)]);
      if (e.request_id) summary.appendChild(h("span", { class: "rid", text: e.request_id, title: "request id" }));
      var tr = h(
        "tr",
        { "data-seq": String(e.seq), "data-kind": e.kind, class: prevMax !== null && e.seq > prevMax ? "new" : null },
        [
          h("td", { class: "t", text: eventTime(e.ts_ms), title: new Date(e.ts_ms).toISOString() + " · #" + e.seq }),
          h("td", { class: "a", text: e.agent || "—", title: e.agent || "" }),
          h("td", { class: "k" }, [h("span", { class: "kind " + cls, text: e.kind })]),
          summary,
        ]
      );
      body.appendChild(tr);
    });
    body.appendChild(none);
    applyEventFilter();
  }

  // ------------------------------------------------------------------ polling

  var lastOk = 0;
  var lastState = null;
  var failures = 0;
  var timer = null;
  var inFlight = false;

  function setLive(state, text) {
    var el = $("live-status");
    el.setAttribute("data-state", state);
    setText($("live-text"), text);
  }

  function agoText() {
    if (!lastOk) return;
    var secs = Math.floor((Date.now() - lastOk) / 1000);
    if (failures === 0) setLive("live", secs < 3 ? "Live" : "Live · " + secs + "s ago");
    else setLive("stale", "Reconnecting · last update " + humanDuration(secs) + " ago");
  }

  function render(st) {
    lastState = st;
    renderTotals(st);
    renderAgents(st);
    renderDenials(st);
    renderChart(st.timeline || []);
    renderEvents(st);
    if (st.generated_at_ms) setText($("generated-at"), "Data as of " + new Date(st.generated_at_ms).toLocaleString());
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
  }

  function poll() {
    if (inFlight) return;
    inFlight = true;
    var ctrl = typeof AbortController === "function" ? new AbortController() : null;
    var to = ctrl ? setTimeout(function () { ctrl.abort(); }, 8000) : null;
    fetch(API, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
      signal: ctrl ? ctrl.signal : undefined,
    })
      .then(function (r) {
        if (r.status === 401) {
          // Session expired or signed out elsewhere: back to the login page.
          window.location.replace("/dashboard?expired=1");
          throw { handled: true };
        }
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (st) {
        failures = 0;
        lastOk = Date.now();
        $("conn-banner").hidden = true;
        render(st);
        agoText();
      })
      .catch(function (e) {
        if (e && e.handled) return;
        failures++;
        if (failures >= 2 || !lastOk) {
          $("conn-banner").hidden = false;
          setText($("conn-banner-text"), "Cannot reach the gateway (" + (e && e.message ? e.message : "network error") + "). Retrying…");
        }
        if (lastOk) agoText();
        else setLive("stale", "Connecting…");
      })
      .then(function () {
        if (to) clearTimeout(to);
        inFlight = false;
        schedule();
      });
  }

  function rerenderAgents() {
    if (lastState) renderAgents(lastState);
  }

  function init() {
    $("agent-filter").addEventListener("input", rerenderAgents);
    $("agent-sort").addEventListener("change", rerenderAgents);
    $("events-filter").addEventListener("change", applyEventFilter);
    var resizeTimer = null;
    window.addEventListener("resize", function () {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(function () {
        if (lastTimeline) renderChart(lastTimeline);
      }, 100);
    });
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden) poll();
    });
    setInterval(agoText, 1000);
    poll();
  }

  // Exposed for tests and debugging.
  window.AEX = { fmtUsd: fmtUsd, humanDuration: humanDuration, poll: poll, sorts: SORTS };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
