// Live worklist: re-fetch this page's rows every few seconds (the server answers 304 from
// a change counter when nothing changed); newly flagged studies flash.
(function () {
  "use strict";
  const tbody = document.getElementById("rows");
  const live = document.getElementById("live");
  const search = document.getElementById("search");
  const form = document.getElementById("filters");
  if (!tbody) return;
  const seconds = Number(tbody.dataset.pollSeconds || "3");
  const rank = { critical: 2, urgent: 1, routine: 0 };
  const known = new Map();
  const range = document.getElementById("range");
  let etag = tbody.dataset.etag || null;  // the rows came with the page: no render on the first poll
  const fresh = new Map();  // newly flagged studies stay marked for a while
  const FRESH_MS = 5 * 60 * 1000;
  const remember = () => tbody.querySelectorAll("tr.row").forEach((tr) => known.set(tr.dataset.uid, tr.dataset.priority));
  remember();

  // "1–50 of 5,000": the total moves as studies arrive, on every page.
  function showRange(headers) {
    const total = Number(headers.get("X-Total-Count"));
    if (!range || !headers.has("X-Total-Count")) return;
    const first = Number(headers.get("X-Range-First")), last = Number(headers.get("X-Range-Last"));
    const n = (v) => v.toLocaleString("en-US");
    range.textContent = first ? `${n(first)}–${n(last)} of ${n(total)}` : `0 of ${n(total)}`;
  }

  async function poll() {
    try {
      const headers = { Accept: "text/html" };
      if (etag) headers["If-None-Match"] = etag;
      const response = await fetch(tbody.dataset.pollUrl + window.location.search,
        { credentials: "same-origin", headers: headers, cache: "no-store" });
      if (response.redirected || response.status === 401) { window.location.reload(); return; }
      if (response.status !== 304 && !response.ok) throw new Error("HTTP " + response.status);
      if (response.status !== 304) {
        etag = response.headers.get("ETag");
        showRange(response.headers);
        const html = await response.text();
        const focused = document.activeElement && document.activeElement.closest("tr.row");
        const focusedUid = focused ? focused.dataset.uid : null;
        tbody.innerHTML = html;
        tbody.querySelectorAll("tr.row").forEach((tr) => {
          const before = known.get(tr.dataset.uid);
          const now = tr.dataset.priority;
          if (now !== "routine" && tr.dataset.read === "no" && (before === undefined || rank[now] > rank[before])) {
            tr.classList.add("flash");
            fresh.set(tr.dataset.uid, Date.now());
          }
          const since = fresh.get(tr.dataset.uid);
          if (since && Date.now() - since < FRESH_MS) tr.classList.add("fresh");
        });
        remember();
        if (focusedUid) {
          const row = tbody.querySelector(`tr.row[data-uid="${CSS.escape(focusedUid)}"]`);
          if (row) row.focus();
        }
      }
      live.textContent = "live · " + new Date().toLocaleTimeString();
      live.classList.remove("stale");
    } catch (err) {
      live.textContent = "connection lost, retrying…";
      live.classList.add("stale");
    }
  }
  setInterval(poll, seconds * 1000);

  form.querySelectorAll("select").forEach((s) => s.addEventListener("change", () => form.submit()));

  // Every row opens its study: a click anywhere on it (a new tab with Ctrl/Cmd or the
  // middle button), or Enter on the focused row. Listeners sit on the tbody, which
  // outlives the rows that every poll replaces. Selecting text is not a click.
  function open(row, newTab) {
    if (!row || !row.dataset.href) return;
    if (newTab) window.open(row.dataset.href, "_blank", "noopener");
    else window.location.assign(row.dataset.href);
  }
  tbody.addEventListener("click", (e) => {
    if (e.target.closest("a, button, input, select, form")) return;  // they do their own thing
    if (window.getSelection && String(window.getSelection()).length > 0) return;
    open(e.target.closest("tr.row"), e.ctrlKey || e.metaKey);
  });
  tbody.addEventListener("auxclick", (e) => {
    if (e.button === 1 && !e.target.closest("a")) open(e.target.closest("tr.row"), true);
  });
  tbody.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && e.target.matches("tr.row")) { e.preventDefault(); open(e.target, e.ctrlKey || e.metaKey); }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "/" && document.activeElement !== search) { e.preventDefault(); search.focus(); }
    if ((e.key === "j" || e.key === "k") && !["INPUT", "SELECT"].includes(document.activeElement.tagName)) {
      const rows = [...tbody.querySelectorAll("tr.row")];
      const i = rows.indexOf(document.activeElement);
      const next = e.key === "j" ? Math.min(rows.length - 1, i + 1) : Math.max(0, i - 1);
      if (rows[next]) rows[next].focus();
    }
  });
})();
