// Live worklist: re-fetch the rows every few seconds; newly flagged studies flash.
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
  let etag = null;
  const fresh = new Map();  // newly flagged studies stay marked for a while
  const FRESH_MS = 5 * 60 * 1000;
  const remember = () => tbody.querySelectorAll("tr.row").forEach((tr) => known.set(tr.dataset.uid, tr.dataset.priority));
  remember();

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
          const link = tbody.querySelector(`tr.row[data-uid="${CSS.escape(focusedUid)}"] a`);
          if (link) link.focus();
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
  document.addEventListener("keydown", (e) => {
    if (e.key === "/" && document.activeElement !== search) { e.preventDefault(); search.focus(); }
    if ((e.key === "j" || e.key === "k") && !["INPUT", "SELECT"].includes(document.activeElement.tagName)) {
      const links = [...tbody.querySelectorAll("td.name a")];
      const i = links.indexOf(document.activeElement);
      const next = e.key === "j" ? Math.min(links.length - 1, i + 1) : Math.max(0, i - 1);
      if (links[next]) links[next].focus();
    }
  });
})();
