// Progressive help only: every page works without it.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button.copy[data-copy]")) {
    const source = document.getElementById(button.dataset.copy);
    if (!source || !navigator.clipboard) continue;
    button.hidden = false;
    button.addEventListener("click", async () => {
      await navigator.clipboard.writeText(source.textContent.trim());
      button.textContent = "Adresse copiée";
    });
  }
  // Drafts: saved a moment after typing stops, and when the page is left.
  for (const form of document.querySelectorAll("form[data-autosave]")) {
    const status = document.getElementById("etat-brouillon");
    let timer = null;
    let dirty = false;
    const save = (keepalive) => {
      if (!dirty) return;
      dirty = false;
      const data = new FormData(form);
      data.delete("fichiers");
      data.set("action", "brouillon");
      fetch(form.action || location.href, {method: "POST", body: data, keepalive,
        credentials: "same-origin", redirect: "manual",
        headers: {"X-Requested-With": "fetch"}})
        .then((r) => {
          // 204: saved. Anything else (an expired session is redirected) is not a save.
          if (status) {
            status.textContent = r.status === 204 ? "Brouillon enregistré"
              : "Brouillon non enregistré : reconnectez-vous.";
          }
          if (r.status !== 204) dirty = true;
        })
        .catch(() => { dirty = true; });
    };
    form.addEventListener("input", () => {
      dirty = true;
      clearTimeout(timer);
      timer = setTimeout(() => save(false), 2000);
    });
    form.addEventListener("submit", () => { dirty = false; clearTimeout(timer); });
    window.addEventListener("pagehide", () => save(true));
  }
  // Documents chosen for a reply: the room left under 10 MB follows the boxes ticked.
  const place = document.getElementById("place-documents");
  const boxes = document.querySelectorAll("input[name=documents][data-size]");
  if (place && boxes.length) {
    const fixed = Number(place.dataset.fixed || 0);
    const update = () => {
      let used = fixed;
      for (const b of boxes) if (b.checked) used += Number(b.dataset.size);
      const left = Number(place.dataset.max) - used;
      place.textContent = left >= 0
        ? `Place restante : ${(Math.floor(left / 1e5) / 10).toFixed(1).replace(".", ",")} Mo sur 10 Mo.`
        : "La sélection dépasse 10 Mo : retirez des documents pour envoyer le message.";
    };
    for (const b of boxes) b.addEventListener("change", update);
  }
  for (const input of document.querySelectorAll("input[type=file][data-room]")) {
    const room = Number(input.dataset.room);
    const hint = document.getElementById(input.getAttribute("aria-describedby"));
    input.addEventListener("change", () => {
      let total = 0;
      for (const f of input.files) total += f.size;
      const left = room - total;
      if (hint) {
        hint.textContent = left >= 0
          ? `Place restante : ${(left / 1e6).toFixed(1).replace(".", ",")} Mo sur 10 Mo.`
          : "Les fichiers dépassent 10 Mo : retirez-en pour pouvoir envoyer.";
      }
      input.setCustomValidity(left >= 0 ? "" : "Les fichiers dépassent 10 Mo.");
    });
  }
});
