// mpstore dashboard: live refresh without a full reload.
// The element with data-poll is re-fetched every data-interval ms from its fragment URL and
// its content replaced by the server-rendered HTML (every store value in it is escaped by
// the server; the page's Content-Security-Policy runs no inline script either). The banner
// says when the store (X-Store-State header) or the dashboard itself cannot be reached.
(function () {
  "use strict";
  const live = document.getElementById("live");
  const banner = document.getElementById("store-status");
  const updated = document.getElementById("updated");
  if (!live || !live.dataset.poll) return;
  const interval = Math.max(500, parseInt(live.dataset.interval, 10) || 3000);

  function say(message) {
    banner.textContent = message;
    banner.classList.toggle("hidden", !message);
  }

  // Open <details> by id, with what they loaded, to restore after a swap.
  function openDetails() {
    return Array.from(live.querySelectorAll("details[open][id]"), (d) => {
      const box = d.querySelector(".lazy");
      return [d.id, d.dataset.loaded && box ? box.innerHTML : null];
    });
  }

  // A <details data-src> loads its content (server-rendered, escaped) when first opened.
  async function load(details) {
    const box = details.querySelector(".lazy");
    if (!box || details.dataset.loaded) return;
    details.dataset.loaded = "1";
    try {
      const response = await fetch(details.dataset.src, {cache: "no-store",
                                                          credentials: "same-origin"});
      if (!response.ok) throw new Error("HTTP " + response.status);
      box.innerHTML = await response.text();
    } catch (err) {
      delete details.dataset.loaded;
      box.textContent = "Could not load: " + err.message;
    }
  }
  document.addEventListener("toggle", (event) => {
    const details = event.target;
    if (details instanceof HTMLDetailsElement && details.open && details.dataset.src) {
      load(details);
    }
  }, true);

  async function refresh() {
    if (document.hidden) return;  // no cost to the store while nobody looks
    let response;
    try {
      response = await fetch(live.dataset.poll, {cache: "no-store", credentials: "same-origin"});
    } catch (err) {
      say("The dashboard cannot be reached (" + err.message + "). Retrying…");
      return;
    }
    if (response.headers.get("X-Store-State") === "down") {
      const reason = decodeURIComponent(response.headers.get("X-Store-Error") || "");
      say("The store cannot be read: " + reason + ". Retrying…");
    } else if (!response.ok) {
      say("The dashboard answered " + response.status + ". Retrying…");
    } else {
      say("");
    }
    if (!response.ok) return;
    const html = await response.text();
    const keep = openDetails();
    live.innerHTML = html;
    for (const [id, content] of keep) {
      const details = document.getElementById(id);
      if (!details) continue;
      const box = details.querySelector(".lazy");
      if (content !== null && box) {
        box.innerHTML = content;
        details.dataset.loaded = "1";
      }
      details.open = true;
    }
    updated.textContent = "updated " + new Date().toLocaleTimeString();
    live.dataset.refreshes = String((parseInt(live.dataset.refreshes, 10) || 0) + 1);
  }

  async function loop() {
    await refresh();
    setTimeout(loop, interval);
  }
  setTimeout(loop, interval);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
})();
