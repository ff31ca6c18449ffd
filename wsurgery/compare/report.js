"use strict";
(function () {
  const data = JSON.parse(document.getElementById("wsurgery-data").textContent);
  const $ = (id) => document.getElementById(id);
  const el = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  };
  const SVG = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs) => {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, String(attrs[k]));
    return e;
  };
  // JSON numbers, or "Infinity" / "-Infinity" / "NaN" (non-finite), or null (no statistic)
  const num = (v) => (v === null || v === undefined ? null : Number(v));
  const fmt = (v, digits) => {
    const x = num(v);
    if (x === null) return "-";
    if (Number.isNaN(x)) return "nan";
    if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
    if (x === 0) return "0";
    return Number(x.toPrecision(digits || 3)).toString();
  };
  const side = (info) => {
    let t = info.dtype + " (" + info.shape.join(", ") + ")";
    const alias = info.alias_of;
    if (alias) t += " = " + (alias.transform.length ? alias.transform.join(" -> ") : "same") + "(" + alias.source + ")";
    return t;
  };

  // ---- summary
  const verdict = $("verdict");
  verdict.textContent = data.equal ? "equal" : "different";
  verdict.className = data.equal ? "verdict-equal" : "verdict-different";
  const criteria = [];
  if (data.atol > 0 || data.rtol > 0 || (data.max_rel_l2 === null && data.min_cosine === null))
    criteria.push("atol " + data.atol + ", rtol " + data.rtol);
  if (data.max_rel_l2 !== null) criteria.push("max_rel_l2 " + data.max_rel_l2);
  if (data.min_cosine !== null) criteria.push("min_cosine " + data.min_cosine);
  if (data.ignore_ties) criteria.push("ties ignored");
  const facts = [
    ["A", data.a], ["B", data.b],
    ["changed", data.changed.length], ["same", data.same],
    ["only in A", data.only_in_a.length], ["only in B", data.only_in_b.length],
    ["criteria", criteria.join("; ")],
  ];
  const dl = $("summary");
  for (const [k, v] of facts) { dl.appendChild(el("dt", k)); dl.appendChild(el("dd", v)); }

  // ---- chart: rel_l2 per module, in layer order
  const chart = $("chart");
  const modules = data.modules || [];
  const drawChart = (log) => {
    chart.replaceChildren();
    $("chart-title").textContent = "rel_l2 per module (depth " + data.depth + ", layer order" +
      (log ? ", log scale)" : ")");
    const finite = modules.map((m) => num(m.rel_l2)).filter((x) => x !== null && Number.isFinite(x) && x > 0);
    const top = finite.length ? Math.max(...finite) : 1;
    const low = finite.length ? Math.min(...finite) : 1;
    const span = Math.log10(top) - Math.log10(low);
    // linear: length by value; log: the smallest non-zero value gets 2%, the largest all
    const length = (x) => (log ? (span > 0 ? 0.02 + (0.98 * (Math.log10(x) - Math.log10(low))) / span : 1) : x / top);
    const row = 18, labelW = 280, barW = 520, valueW = 90, pad = 4;
    const height = modules.length * row + 2 * pad;
    const root = svg("svg", { id: "module-chart", width: labelW + barW + valueW, height: height,
      viewBox: "0 0 " + (labelW + barW + valueW) + " " + height, role: "img" });
    const title = svg("title", {});
    title.textContent = "rel_l2 per module";
    root.appendChild(title);
    const clip = svg("clipPath", { id: "label-clip" });
    clip.appendChild(svg("rect", { x: 0, y: 0, width: labelW - 8, height: height }));
    root.appendChild(clip);
    root.appendChild(svg("line", { x1: labelW, y1: 0, x2: labelW, y2: height, class: "grid" }));
    modules.forEach((m, i) => {
      const y = pad + i * row;
      const label = svg("text", { x: labelW - 8, y: y + row - 5, "text-anchor": "end", "clip-path": "url(#label-clip)" });
      label.textContent = m.name === "" ? "(root)" : m.name;
      root.appendChild(label);
      const x = num(m.rel_l2);
      if (x !== null && x > 0) {
        const inf = !Number.isFinite(x);
        const w = inf ? barW : Math.max(1, barW * length(x));
        const bar = svg("rect", { x: labelW, y: y + 2, width: w, height: row - 4, class: inf ? "bar unbounded" : "bar" });
        const tip = svg("title", {});
        tip.textContent = (m.name === "" ? "(root)" : m.name) + ": rel_l2 " + fmt(m.rel_l2, 4) +
          ", " + m.changed + " of " + m.tensors + " changed";
        bar.appendChild(tip);
        root.appendChild(bar);
      }
      const value = svg("text", { x: labelW + barW + valueW - 4, y: y + row - 5, "text-anchor": "end" });
      value.textContent = fmt(m.rel_l2, 3);
      root.appendChild(value);
    });
    chart.appendChild(root);
  };
  if (!modules.length) {
    chart.appendChild(el("p", "No module rollup in this report.", "muted"));
    $("scale-box").hidden = true;
  }

  // ---- names on one side only
  for (const [id, names] of [["only-a", data.only_in_a], ["only-b", data.only_in_b]]) {
    const box = $(id);
    if (!names.length) { box.appendChild(el("p", "none", "muted")); continue; }
    const ul = el("ul", null, "names");
    for (const n of names) ul.appendChild(el("li", n));
    box.appendChild(ul);
  }

  // ---- the table of changed tensors: sorted and filtered from the URL fragment
  const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "variant" });
  const REASONS = ["shape", "dtype", "alias", "value"];
  const columns = [
    { key: "name", label: "name", cls: "name", text: (c) => c.name },
    { key: "reason", label: "reason", text: (c) => c.reason },
    { key: "a", label: "A", text: (c) => side(c.a) },
    { key: "b", label: "B", text: (c) => side(c.b) },
    { key: "numel", label: "elements", num: true, text: (c) => (c.numel === null ? "-" : c.numel.toLocaleString("en-US")) },
    { key: "mismatched", label: "mismatched", num: true, text: (c) => (c.mismatched === null ? "-" : c.mismatched.toLocaleString("en-US")) },
    { key: "max_abs_diff", label: "max |a-b|", num: true, text: (c) => fmt(c.max_abs_diff, 3) },
    { key: "max_rel_diff", label: "max rel", num: true, text: (c) => fmt(c.max_rel_diff, 3) },
    { key: "rel_l2", label: "rel l2", num: true, text: (c) => fmt(c.rel_l2, 3) },
    { key: "cosine", label: "cosine", num: true, text: (c) => fmt(c.cosine, 9) },
  ];
  const byKey = Object.fromEntries(columns.map((c) => [c.key, c]));
  const rows = data.changed.map((c, i) => ({ c, i }));
  const state = () => {
    const p = new URLSearchParams(location.hash.replace(/^#/, ""));
    const sort = byKey[p.get("sort")] ? p.get("sort") : null;
    const order = p.get("order") === "asc" || p.get("order") === "desc" ? p.get("order") : (sort && byKey[sort].num ? "desc" : "asc");
    return { sort, order, filter: p.get("filter") || "", reason: REASONS.includes(p.get("reason")) ? p.get("reason") : "",
      scale: p.get("scale") === "log" ? "log" : "" };
  };
  const setState = (s) => {
    const p = new URLSearchParams();
    if (s.sort) { p.set("sort", s.sort); p.set("order", s.order); }
    if (s.filter) p.set("filter", s.filter);
    if (s.reason) p.set("reason", s.reason);
    if (s.scale) p.set("scale", s.scale);
    history.replaceState(null, "", "#" + p.toString());
    render();
  };
  const value = (c, key) => {
    if (key === "a" || key === "b") return side(c[key]);
    if (key === "reason") return REASONS.indexOf(c.reason);
    return c[key];
  };
  const compare = (key, numeric) => (x, y) => {
    const u = value(x.c, key), v = value(y.c, key);
    if (!numeric) return typeof u === "number" ? u - v : collator.compare(u, v);
    const a = num(u), b = num(v);
    if (a === null || b === null) return a === null && b === null ? 0 : NaN; // placed by sortRows
    const fa = Number.isNaN(a) ? Infinity : a, fb = Number.isNaN(b) ? Infinity : b;
    return fa < fb ? -1 : fa > fb ? 1 : 0;
  };
  const sortRows = (list, s) => {
    if (!s.sort) return list.slice(); // the report's order: most severe first
    const col = byKey[s.sort];
    const sign = s.order === "desc" ? -1 : 1;
    const cmp = compare(s.sort, !!col.num);
    const missing = (r) => col.num && num(value(r.c, s.sort)) === null;
    return list.slice().sort((x, y) => {
      const mx = missing(x), my = missing(y);
      if (mx || my) return mx === my ? x.i - y.i : mx ? 1 : -1; // no statistic: always last
      return sign * cmp(x, y) || x.i - y.i;
    });
  };
  const head = $("head");
  const headers = {};
  for (const col of columns) {
    const th = el("th", col.label);
    th.dataset.key = col.key;
    th.addEventListener("click", () => {
      const s = state();
      const order = s.sort === col.key ? (s.order === "asc" ? "desc" : "asc") : (col.num ? "desc" : "asc");
      setState({ ...s, sort: col.key, order });
    });
    headers[col.key] = th;
    head.appendChild(th);
  }
  const filterBox = $("filter"), reasonBox = $("reason");
  for (const r of REASONS) { const o = el("option", r); o.value = r; reasonBox.appendChild(o); }
  filterBox.addEventListener("input", () => setState({ ...state(), filter: filterBox.value }));
  reasonBox.addEventListener("change", () => setState({ ...state(), reason: reasonBox.value }));
  const scaleBox = $("log-scale");
  scaleBox.addEventListener("change", () => setState({ ...state(), scale: scaleBox.checked ? "log" : "" }));
  const body = $("rows");
  function render() {
    const s = state();
    filterBox.value = s.filter;
    reasonBox.value = s.reason;
    scaleBox.checked = s.scale === "log";
    if (modules.length) drawChart(s.scale === "log");
    const needle = s.filter.toLowerCase();
    const shown = sortRows(rows, s).filter((r) =>
      (!needle || r.c.name.toLowerCase().includes(needle)) && (!s.reason || r.c.reason === s.reason));
    for (const key in headers) headers[key].removeAttribute("aria-sort");
    if (s.sort) headers[s.sort].setAttribute("aria-sort", s.order === "asc" ? "ascending" : "descending");
    const frag = document.createDocumentFragment();
    for (const r of shown) {
      const tr = el("tr");
      tr.dataset.index = String(r.i);
      for (const col of columns) tr.appendChild(el("td", col.text(r.c), col.num ? "num" : col.cls));
      frag.appendChild(tr);
    }
    body.replaceChildren(frag);
    $("count").textContent = "showing " + shown.length + " of " + rows.length + " changed tensors";
    document.body.dataset.shown = String(shown.length);
  }
  window.addEventListener("hashchange", render);
  render();
  document.body.dataset.ready = "1";
})();
