// Critical-finding banners: kept current from the server, acknowledged with one click,
// announced with an optional tone and a browser notification where the user allowed it.
// The server decides what is pending (critical, unread, not acknowledged by anyone), so a
// reload or another user's acknowledgement is reflected on the next poll.
(function () {
  "use strict";
  const stack = document.getElementById("alerts");
  if (!stack) return;
  const seconds = Number(stack.dataset.pollSeconds || "3");
  const soundButton = document.getElementById("alert-sound");
  const notifyButton = document.getElementById("alert-notify");
  const SOUND_KEY = "radtriage.alerts.sound";
  let etag = null;
  // What the server sent for each banner on screen: an unchanged banner keeps its node,
  // so a screen reader does not announce it again and a focused button keeps focus.
  const served = new WeakMap();
  // Alerts already announced by this page (those at load count as seen), by study and the
  // time it was flagged: a study flagged again after an acknowledgement is announced again.
  const seen = new Set();
  [...stack.children].forEach((el) => { served.set(el, el.outerHTML); if (el.dataset.uid) seen.add(el.dataset.key); });

  // ---- sound: off by default, remembered in this browser ----
  let audio = null;
  function soundOn() {
    try { return window.localStorage.getItem(SOUND_KEY) === "on"; } catch (err) { return false; }
  }
  function audioContext() {
    const Context = window.AudioContext || window.webkitAudioContext;
    if (!Context) return null;
    if (!audio) audio = new Context();
    if (audio.state === "suspended") audio.resume().catch(() => {});
    return audio;
  }
  function tone() {
    // Two short 880 Hz beeps, generated: no audio file to fetch or to block.
    const context = audioContext();
    if (!context) return;
    const start = context.currentTime + 0.01;
    [0, 0.25].forEach((offset) => {
      const oscillator = context.createOscillator();
      const gain = context.createGain();
      oscillator.type = "sine";
      oscillator.frequency.value = 880;
      gain.gain.setValueAtTime(0.0001, start + offset);
      gain.gain.exponentialRampToValueAtTime(0.3, start + offset + 0.02);
      gain.gain.exponentialRampToValueAtTime(0.0001, start + offset + 0.18);
      oscillator.connect(gain).connect(context.destination);
      oscillator.start(start + offset);
      oscillator.stop(start + offset + 0.2);
    });
  }
  function showSound() {
    const on = soundOn();
    soundButton.setAttribute("aria-pressed", on ? "true" : "false");
    soundButton.textContent = on ? "Sound on" : "Sound off";
  }
  if (soundButton) {
    soundButton.hidden = false;
    showSound();
    soundButton.addEventListener("click", () => {
      const on = !soundOn();
      try { window.localStorage.setItem(SOUND_KEY, on ? "on" : "off"); } catch (err) { /* private mode: this page only */ }
      showSound();
      if (on) tone();  // a click may start audio: the user hears what they turned on
    });
    // Browsers start audio only after a gesture on the page: after a reload, the first
    // click or key press anywhere unlocks the tone.
    const unlock = () => { if (soundOn()) audioContext(); };
    document.addEventListener("pointerdown", unlock, { once: true, capture: true });
    document.addEventListener("keydown", unlock, { once: true, capture: true });
  }

  // ---- browser notifications: only after the user asked for them ----
  const canNotify = "Notification" in window;
  function showNotify() {
    if (!notifyButton) return;
    if (!canNotify) { notifyButton.hidden = true; return; }
    notifyButton.hidden = false;
    const permission = Notification.permission;
    notifyButton.disabled = permission !== "default";
    notifyButton.textContent = permission === "granted" ? "Notifications on"
      : permission === "denied" ? "Notifications blocked" : "Enable notifications";
    if (permission === "denied") notifyButton.title = "Allow notifications for this site in the browser's settings";
  }
  showNotify();
  if (notifyButton && canNotify) {
    notifyButton.addEventListener("click", () => {
      Promise.resolve(Notification.requestPermission()).then(showNotify, showNotify);
    });
  }
  function notify(el) {
    if (!canNotify || Notification.permission !== "granted") return;
    try {
      const note = new Notification("Critical finding: " + el.dataset.patient, {
        body: el.dataset.finding,
        tag: "radtriage-critical-" + el.dataset.uid,  // one per study, even with several tabs open
        requireInteraction: true,
      });
      note.onclick = () => { window.focus(); note.close(); };
    } catch (err) { /* a browser that only notifies from a service worker: the banner remains */ }
  }

  // ---- keep the stack in step with the server, node by node ----
  function update(html) {
    const template = document.createElement("template");
    template.innerHTML = html;
    const current = new Map([...stack.children].map((el) => [el.dataset.key, el]));
    const wanted = [...template.content.children].map((incoming) => {
      const existing = current.get(incoming.dataset.key);
      if (existing && served.get(existing) === incoming.outerHTML) return existing;
      served.set(incoming, incoming.outerHTML);
      return incoming;
    });
    let cursor = stack.firstElementChild;
    const fresh = [];
    wanted.forEach((el) => {
      if (el === cursor) { cursor = cursor.nextElementSibling; return; }
      stack.insertBefore(el, cursor);
      if (el.dataset.uid && !seen.has(el.dataset.key)) { seen.add(el.dataset.key); fresh.push(el); }
    });
    [...stack.children].forEach((el) => { if (!wanted.includes(el)) el.remove(); });
    if (fresh.length) {
      fresh.forEach((el) => el.classList.add("alert-new"));
      if (soundOn()) tone();  // one tone for however many arrived together
      fresh.forEach(notify);
    }
  }

  async function poll() {
    try {
      const headers = { Accept: "text/html" };
      if (etag) headers["If-None-Match"] = etag;
      const response = await fetch(stack.dataset.pollUrl, { credentials: "same-origin", headers: headers, cache: "no-store" });
      if (response.redirected || response.status === 401 || response.status === 304 || !response.ok) return;
      etag = response.headers.get("ETag");
      update(await response.text());
    } catch (err) {
      // worklist.js shows "connection lost" for the same server; the banners stay as they are.
    }
  }
  setInterval(poll, seconds * 1000);

  // ---- acknowledge without leaving the page (the form posts by itself without scripts) ----
  function focusAfter(removed) {
    const next = removed.nextElementSibling || removed.previousElementSibling;
    const target = (next && next.querySelector("button, a")) || document.querySelector("#rows tr.row") || document.getElementById("search");
    if (target) target.focus();
  }
  stack.addEventListener("submit", async (e) => {
    const form = e.target.closest("form.alert-ack");
    if (!form) return;
    e.preventDefault();
    const banner = form.closest(".alert-critical");
    const button = form.querySelector("button");
    const hadFocus = banner.contains(document.activeElement);
    const old = banner.querySelector(".alert-error");
    if (old) old.remove();
    button.disabled = true;
    button.textContent = "Acknowledging…";
    try {
      const response = await fetch(form.dataset.api, {
        method: "POST",
        credentials: "same-origin",
        headers: { Accept: "application/json", "X-CSRF-Token": form.elements.csrf_token.value },
      });
      if (response.status === 401) { window.location.reload(); return; }
      // 409: no longer critical (the flow re-read it): nothing left to acknowledge either.
      if (!response.ok && response.status !== 409) {
        let detail = "HTTP " + response.status;
        try { detail = (await response.json()).detail || detail; } catch (err) { /* not JSON */ }
        throw new Error(detail);
      }
      if (hadFocus) focusAfter(banner);
      banner.remove();
      etag = null;  // the next poll answers in full
    } catch (err) {
      button.disabled = false;
      button.textContent = "Acknowledge";
      const message = document.createElement("span");
      message.className = "alert-error";
      message.textContent = "Not recorded: " + err.message + ". Try again.";
      form.after(message);
    }
  });
})();
