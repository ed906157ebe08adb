// Slice viewer: the slider scrolls the series; window and overlay re-render server-side.
(function () {
  "use strict";
  const viewer = document.getElementById("viewer");
  if (!viewer) return;
  const slices = JSON.parse(document.getElementById("slices").textContent);
  const img = document.getElementById("slice");
  const slider = document.getElementById("slider");
  const label = document.getElementById("slice-label");
  const windowSel = document.getElementById("window");
  const overlaySel = document.getElementById("overlay");
  const study = viewer.dataset.study;
  const keyIndex = Number(viewer.dataset.keyIndex);
  const url = (i) => `/studies/${encodeURIComponent(study)}/image/${encodeURIComponent(slices[i])}.png` +
    `?window=${windowSel.value}&overlay=${overlaySel.value}`;
  const preload = (i) => { if (i >= 0 && i < slices.length) { const p = new Image(); p.src = url(i); } };

  function show(i) {
    i = Math.max(0, Math.min(slices.length - 1, i));
    slider.value = String(i);
    img.src = url(i);
    img.alt = `Slice ${i + 1} of ${slices.length}`;
    label.textContent = `${i + 1} / ${slices.length}` + (i === keyIndex ? " (key)" : "");
    preload(i + 1); preload(i - 1);
  }
  slider.addEventListener("input", () => show(Number(slider.value)));
  windowSel.addEventListener("change", () => show(Number(slider.value)));
  overlaySel.addEventListener("change", () => show(Number(slider.value)));
  document.getElementById("to-key").addEventListener("click", () => show(keyIndex));
  img.addEventListener("wheel", (e) => { e.preventDefault(); show(Number(slider.value) + (e.deltaY > 0 ? 1 : -1)); }, { passive: false });
  document.addEventListener("keydown", (e) => {
    if (["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName) && document.activeElement !== slider) return;
    if (document.activeElement === slider) return; // the range input handles its own arrows
    if (e.key === "ArrowUp" || e.key === "ArrowRight") { e.preventDefault(); show(Number(slider.value) + 1); }
    if (e.key === "ArrowDown" || e.key === "ArrowLeft") { e.preventDefault(); show(Number(slider.value) - 1); }
    if (e.key === "k") show(keyIndex);
  });
  label.textContent = `${keyIndex + 1} / ${slices.length} (key)`;
  preload(keyIndex + 1); preload(keyIndex - 1);
})();
