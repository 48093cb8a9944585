// emrwatch alert feed: live rows over Server-Sent Events, paging, small conveniences.
// Plain JavaScript, no build step. All HTML inserted here was rendered (and escaped,
// and masked for the reader's role) by the server.
(function () {
  "use strict";

  function rowFrom(html) {
    const body = document.createElement("tbody");
    body.innerHTML = html.trim();
    return body.firstElementChild;
  }

  function feedPage() {
    const table = document.getElementById("alerts");
    const rows = document.getElementById("rows");
    if (!table || !rows) return;
    const live = document.getElementById("live");
    const total = document.getElementById("total");
    const empty = document.getElementById("empty");
    const banner = document.getElementById("banner");
    const query = table.dataset.query || "";
    let since = table.dataset.since || "0";

    function setLive(on, text) {
      if (!live) return;
      live.className = "live " + (on ? "live-on" : "live-off");
      live.textContent = text;
    }

    function bumpTotal(delta) {
      if (!total) return;
      const n = parseInt(total.dataset.total || "0", 10) + delta;
      total.dataset.total = String(n);
      total.textContent = n.toLocaleString("en-US") + " " + (total.dataset.word || "");
    }

    function showBanner(text, linkText, href) {
      banner.hidden = false;
      banner.textContent = text;
      const a = document.createElement("a");
      a.href = href;
      a.textContent = linkText;
      banner.append(a);
    }

    function apply(d) {
      const existing = document.getElementById("row-" + d.alert_id);
      if (!d.match) {
        if (existing) {
          existing.classList.add("leaving");
          setTimeout(function () { existing.remove(); }, 450);
          bumpTotal(-1);
        }
        return;
      }
      const row = rowFrom(d.html);
      if (existing) {
        const was = existing.querySelector(".pick input");
        const now = row.querySelector(".pick input");
        if (was && now) now.checked = was.checked;  // an update keeps the selection
        existing.replaceWith(row);
        row.classList.add("updated");
      } else {
        rows.prepend(row);
        row.classList.add("arrived");
        bumpTotal(1);
        if (empty) empty.hidden = true;
      }
    }

    // a case untouched past its severity's response target says so, and keeps counting
    function markLate() {
      rows.querySelectorAll("tr[data-state=new]").forEach(function (tr) {
        const badge = tr.querySelector(".late");
        const received = Date.parse(tr.dataset.received || "");
        if (!badge || isNaN(received) || tr.classList.contains("is-retracted")) return;
        const waited = (Date.now() - received) / 3600000;
        const late = waited > parseFloat(tr.dataset.targetH || "Infinity");
        badge.hidden = !late;
        if (late) badge.textContent = "untriaged " + Math.floor(waited) + " h";
      });
    }
    setInterval(markLate, 60000);

    function connect() {
      const url = "/events?" + (query ? query + "&" : "") + "since=" + encodeURIComponent(since);
      const es = new EventSource(url);
      es.onopen = function () { setLive(true, "Live"); };
      es.onerror = function () {
        // the browser reconnects by itself, sending Last-Event-ID; it gives up only when
        // the server refuses the stream (the session has ended)
        if (es.readyState === EventSource.CLOSED) {
          setLive(false, "Offline");
          showBanner("Live updates stopped: your session may have ended. ", "Log in again", "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search));
        } else {
          setLive(false, "Reconnecting…");
        }
      };
      es.addEventListener("alert", function (ev) {
        if (ev.lastEventId) since = ev.lastEventId;
        apply(JSON.parse(ev.data));
      });
      es.addEventListener("signed-out", function (ev) {
        es.close();
        const d = JSON.parse(ev.data);
        if (d.idle) { leave("idle=1"); return; }
        // ended by a supervisor, or from another browser: nothing stays on the screen
        if (d.why === "supervisor" || d.why === "elsewhere") { leave("ended=" + d.why); return; }
        setLive(false, "Offline");
        showBanner("Your session has ended. ", "Log in again", "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search));
      });
      es.addEventListener("reset", function (ev) {
        es.close();
        const d = JSON.parse(ev.data);
        setLive(false, "Paused");
        const what = d.count > 0
          ? d.count.toLocaleString("en-US") + " alerts changed at once. "
          : "The feed server restarted. ";
        showBanner(what, "Reload the feed", window.location.href);
      });
    }

    rows.addEventListener("click", function (ev) {
      if (ev.target.closest("a, button, input, .pick")) return;
      const tr = ev.target.closest("tr[data-href]");
      if (tr) window.location.href = tr.dataset.href;
    });

    // several cases at once: the checkboxes belong to the bulk form (form="bulk")
    const pickAll = document.getElementById("pick-all");
    if (pickAll) {
      pickAll.addEventListener("change", function () {
        rows.querySelectorAll(".pick input").forEach(function (b) { b.checked = pickAll.checked; });
      });
    }
    const bulk = document.getElementById("bulk");
    if (bulk) {
      bulk.addEventListener("submit", function (ev) {
        if (!rows.querySelector(".pick input:checked")) {
          ev.preventDefault();
          banner.hidden = false;
          banner.textContent = "Select one or more cases first (the boxes on the left).";
        }
      });
    }

    const form = document.getElementById("filters");
    if (form) {
      form.addEventListener("change", function (ev) {
        if (ev.target.tagName === "SELECT") form.requestSubmit();
      });
      form.addEventListener("submit", function () {
        // keep the URL short: leave out filters set to "any"
        form.querySelectorAll("select").forEach(function (s) { s.disabled = !s.value; });
      });
    }

    const more = document.getElementById("more");
    if (more) {
      more.addEventListener("click", function () {
        more.disabled = true;
        const url = "/api/alerts?" + (query ? query + "&" : "") + "cursor=" + encodeURIComponent(more.dataset.cursor);
        fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
          .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
          .then(function (d) {
            const body = document.createElement("tbody");
            body.innerHTML = d.html;
            Array.from(body.children).forEach(function (tr) {
              if (!document.getElementById(tr.id)) rows.append(tr);
            });
            more.dataset.cursor = d.next_cursor || "";
            more.hidden = !d.next_cursor;
          })
          .catch(function () { more.textContent = "Could not load more; try again"; })
          .finally(function () { more.disabled = false; });
      });
    }

    connect();
  }

  function casePage() {
    const form = document.getElementById("triage-form");
    if (!form) return;
    const note = document.getElementById("note");
    form.addEventListener("submit", function (ev) {
      const action = ev.submitter && ev.submitter.dataset.action;
      if (action && action.indexOf("close_") === 0 && !note.value.trim()) {
        ev.preventDefault();
        note.setCustomValidity("Closing a case needs a note: what did you find?");
        note.reportValidity();
        note.addEventListener("input", function () { note.setCustomValidity(""); }, { once: true });
      }
    });
  }

  // feed.idle_timeout_s: the user's typing, clicking and scrolling keep the session in
  // use (a ping at most once a minute, or a third of the timeout); without any, the page
  // leaves for the login before the server's timeout, so no chart stays on an
  // unattended screen
  function idleLogout() {
    const idle = parseFloat(document.body.dataset.idleS || "0");
    if (!(idle > 0)) return;
    const token = document.querySelector("form.logout input[name=csrf_token]");
    let lastActive = Date.now();
    let lastPing = Date.now();
    const pingEvery = Math.min(60000, idle * 1000 / 3);
    function active() {
      lastActive = Date.now();
      if (lastActive - lastPing < pingEvery || !token) return;
      lastPing = lastActive;
      fetch("/api/alive", {
        method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": token.value },
      }).then(function (r) { if (r.status === 401) leave("idle=1"); }).catch(function () {});
    }
    ["keydown", "mousedown", "scroll", "touchstart"].forEach(function (t) {
      window.addEventListener(t, active, { passive: true, capture: true });
    });
    let leaving = false;
    setInterval(function () {
      if (leaving || Date.now() - lastActive <= idle * 1000 - 5000) return;
      // a little before the server's timeout: end the session there too, then leave
      leaving = true;
      const go = function () { leave("idle=1"); };
      if (!token) { go(); return; }
      fetch("/api/idle", {
        method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": token.value },
      }).then(go, go);
    }, 5000);
  }

  function leave(why) {
    const here = window.location.pathname + window.location.search;
    window.location.replace("/login?" + why + "&next=" + encodeURIComponent(here));
  }

  feedPage();
  casePage();
  idleLogout();
})();
