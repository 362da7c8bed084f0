// dicom-node pages: small progressive enhancements; every page works without this script.
(function () {
  "use strict";

  // Rows with data-href open on click (the first cell holds a real link for the keyboard).
  document.addEventListener("click", function (ev) {
    var row = ev.target.closest && ev.target.closest("tr[data-href]");
    if (!row || ev.target.closest("a, button, input, select, form")) return;
    window.location.href = row.getAttribute("data-href");
  });

  // Confirm destructive forms.
  document.addEventListener("submit", function (ev) {
    var msg = ev.target.getAttribute && ev.target.getAttribute("data-confirm");
    if (msg && !window.confirm(msg)) ev.preventDefault();
  });

  // Worklist auto-refresh: re-fetch the results fragment, unless the user is busy in it.
  var results = document.getElementById("worklist-results");
  if (results) {
    var seconds = parseInt(results.getAttribute("data-refresh-seconds") || "15", 10);
    var refresh = function () {
      return fetch(results.getAttribute("data-refresh-url"), { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { if (r.ok && !r.redirected) return r.text(); throw new Error("refresh " + r.status); })
        .then(function (html) { results.innerHTML = html; })
        .catch(function () { /* keep the current table; try again next time */ });
    };
    window.dicomNodeRefreshWorklist = refresh;
    setInterval(function () {
      if (document.hidden) return;
      // Do not move the table under someone who is tabbing through it.
      if (results.contains(document.activeElement) && document.activeElement !== document.body) return;
      refresh();
    }, seconds * 1000);
  }

  // The study page's views: three planes, window presets, zoom, scrolling, choosing a nodule,
  // and the readers' accept/reject, all without reloading the page (the links and forms work
  // without this script). Each view's state is written to data-shown="<finding>:<offset>:<window>:<zoom>"
  // once its image is on screen.
  var viewer = document.querySelector(".viewer[data-finding]");
  if (viewer) {
    var state = {
      finding: viewer.getAttribute("data-finding"),
      window: viewer.getAttribute("data-window") || "lung",
      zoom: parseInt(viewer.getAttribute("data-zoom") || "1", 10)
    };
    var views = {};
    viewer.querySelectorAll("figure.view[data-plane]").forEach(function (fig) {
      var plane = fig.getAttribute("data-plane");
      views[plane] = {
        fig: fig, plane: plane, img: fig.querySelector("img"), label: fig.querySelector(".slice-label"),
        slider: fig.querySelector("input.slider"), offset: parseInt(fig.getAttribute("data-offset") || "0", 10),
        busy: false, wanted: null, centre: null, count: null
      };
    });
    var url = function (v, offset) {
      return "/api/findings/" + state.finding + "/image?plane=" + v.plane + "&offset=" + offset +
        "&zoom=" + state.zoom + "&window=" + state.window;
    };
    var load = function (v, offset) {
      v.wanted = offset;
      if (v.busy) return;
      v.busy = true;
      var target = v.wanted, key = state.finding + ":" + target + ":" + state.window + ":" + state.zoom;
      var asked = url(v, target);
      fetch(asked, { credentials: "same-origin" }).then(function (r) {
        if (!r.ok) throw new Error("image " + r.status);
        var idx = parseInt(r.headers.get("X-Slice-Index"), 10), count = parseInt(r.headers.get("X-Slice-Count"), 10);
        var centre = parseInt(r.headers.get("X-Centre-Index"), 10);
        return r.blob().then(function (b) {
          var old = v.img.src;
          v.img.src = URL.createObjectURL(b);
          if (old.indexOf("blob:") === 0) URL.revokeObjectURL(old);
          v.offset = isNaN(idx) || isNaN(centre) ? target : idx - centre;
          v.count = count; v.centre = centre;
          v.label.textContent = (v.offset === 0 ? "nodule centre" : (v.offset > 0 ? "+" : "") + v.offset + " slices") +
            (isNaN(idx) ? "" : " · slice " + (idx + 1) + " of " + count);
          if (v.slider && !isNaN(centre)) {
            v.slider.min = String(-centre); v.slider.max = String(count - 1 - centre); v.slider.value = String(v.offset);
            v.slider.hidden = false;
          }
          v.fig.setAttribute("data-shown", key);
        });
      }).catch(function () { /* keep the image shown */ }).then(function () {
        v.busy = false;
        // Asked for something else meanwhile (another slice, nodule, window or zoom): show that.
        if (v.wanted !== null && url(v, v.wanted) !== asked) { load(v, v.wanted); } else { v.wanted = null; }
      });
    };
    var step = function (v, d) {
      var from = v.wanted !== null ? v.wanted : v.offset, next = from + d;
      if (v.centre !== null && v.count !== null) next = Math.max(-v.centre, Math.min(v.count - 1 - v.centre, next));
      if (next !== from) load(v, next);
    };
    var all = function (resetOffsets) {
      Object.keys(views).forEach(function (p) {
        var v = views[p];
        if (resetOffsets) { v.offset = 0; v.centre = null; v.count = null; }
        load(v, v.offset);
      });
    };
    var press = function (selector, attr, value) {
      document.querySelectorAll(selector).forEach(function (a) {
        a.setAttribute("aria-pressed", String(a.getAttribute(attr) === String(value)));
      });
    };
    var remember = function () {  // the address bar says what is shown (reload or share keeps it)
      if (!window.history || !history.replaceState) return;
      history.replaceState(null, "", "?finding=" + state.finding + "&zoom=" + state.zoom + "&window=" + state.window + "#viewer");
    };
    var setWindow = function (name) { state.window = name; press("a.window[data-window]", "data-window", name); all(false); remember(); };
    var setZoom = function (z) { state.zoom = z; press("a.zoom[data-zoom]", "data-zoom", z); all(false); remember(); };
    var select = function (findingId) {
      var row = document.querySelector("tr[data-finding-id=\"" + findingId + "\"]");
      if (!row) return false;
      state.finding = String(findingId);
      viewer.setAttribute("data-finding", state.finding);
      document.querySelectorAll("tr[data-finding-id]").forEach(function (tr) {
        var on = tr === row;
        tr.classList.toggle("selected", on);
        var a = tr.querySelector("a.nodule-link");
        if (a) { if (on) a.setAttribute("aria-current", "true"); else a.removeAttribute("aria-current"); }
      });
      var n = row.getAttribute("data-number");
      var head = document.getElementById("viewer-nodule");
      if (head) head.textContent = "nodule " + n;
      Object.keys(views).forEach(function (p) {
        views[p].img.alt = p.charAt(0).toUpperCase() + p.slice(1) + " CT slice through nodule " + n + " (" +
          row.getAttribute("data-diameter") + "), nodule outlined";
      });
      all(true);
      remember();
      return true;
    };
    window.dicomNodeStudy = { select: select, setWindow: setWindow, setZoom: setZoom, state: state, views: views };

    document.querySelectorAll("a.window[data-window]").forEach(function (a) {
      a.addEventListener("click", function (e) { e.preventDefault(); setWindow(a.getAttribute("data-window")); });
    });
    document.querySelectorAll("a.zoom[data-zoom]").forEach(function (a) {
      a.addEventListener("click", function (e) { e.preventDefault(); setZoom(parseInt(a.getAttribute("data-zoom"), 10)); });
    });
    document.querySelectorAll("a.nodule-link[data-finding-id]").forEach(function (a) {
      a.addEventListener("click", function (e) {
        if (select(a.getAttribute("data-finding-id"))) {
          e.preventDefault();
          viewer.scrollIntoView({ block: "nearest" });
        }
      });
    });
    document.querySelectorAll("tr[data-finding-id]").forEach(function (tr) {
      tr.removeAttribute("data-href");  // handled here, not by the generic row-click navigation
      tr.addEventListener("click", function (e) {
        if (e.target.closest("a, button, input, select, form, label")) return;
        select(tr.getAttribute("data-finding-id"));
      });
    });
    var windowKeys = { "1": "lung", "2": "mediastinum", "3": "bone" };
    Object.keys(views).forEach(function (p) {
      var v = views[p];
      v.fig.querySelectorAll("a.step[data-step]").forEach(function (a) {
        a.addEventListener("click", function (e) { e.preventDefault(); step(v, parseInt(a.getAttribute("data-step"), 10)); });
      });
      var centre = v.fig.querySelector("a.centre");
      if (centre) centre.addEventListener("click", function (e) { e.preventDefault(); load(v, 0); });
      if (v.slider) {
        v.slider.hidden = false;
        v.slider.addEventListener("input", function () { load(v, parseInt(v.slider.value, 10)); });
      }
      v.img.addEventListener("keydown", function (e) {
        var d = { ArrowUp: -1, ArrowDown: 1, PageUp: -5, PageDown: 5, k: -1, j: 1 }[e.key];
        if (e.key === "Home") { e.preventDefault(); load(v, 0); return; }
        if (e.key === "z" || e.key === "Z") { e.preventDefault(); setZoom(state.zoom === 1 ? 2 : state.zoom === 2 ? 4 : 1); return; }
        if (windowKeys[e.key]) { e.preventDefault(); setWindow(windowKeys[e.key]); return; }
        if (d) { e.preventDefault(); step(v, d); }
      });
      v.img.addEventListener("wheel", function (e) { e.preventDefault(); step(v, e.deltaY > 0 ? 1 : -1); }, { passive: false });
    });
  }

  // Readers' accept/reject: posted with fetch (same form, same CSRF token), the row updated in place.
  document.querySelectorAll("form.review-form").forEach(function (form) {
    form.addEventListener("submit", function (ev) {
      if (!window.fetch || !ev.submitter) return;  // the plain form post works too
      ev.preventDefault();
      var body = new URLSearchParams(new FormData(form));
      body.set("decision", ev.submitter.value);
      var cell = form.closest(".review-cell"), out = cell && cell.querySelector(".review-state");
      fetch(form.action, {
        method: "POST", credentials: "same-origin", body: body,
        headers: { "Accept": "application/json" }
      }).then(function (r) { return r.json().then(function (j) { return { ok: r.ok, j: j }; }); }).then(function (res) {
        if (!out) return;
        out.textContent = "";
        var span = document.createElement("span");
        if (!res.ok) { span.className = "decision decision-rejected"; span.textContent = res.j.detail || "Not saved"; out.appendChild(span); return; }
        span.className = "decision decision-" + res.j.decision;
        span.textContent = res.j.decision.charAt(0).toUpperCase() + res.j.decision.slice(1);
        var who = document.createElement("span");
        who.className = "muted small";
        who.textContent = " by " + res.j.reviewer + ", just now";
        out.appendChild(span); out.appendChild(who);
        if (res.j.comment) {
          var c = document.createElement("span"); c.className = "small"; c.textContent = "\u201c" + res.j.comment + "\u201d";
          out.appendChild(document.createElement("br")); out.appendChild(c);
        }
        var sum = document.querySelector("#review-summary .reviews, #review-summary .muted"), r = res.j.reviews;
        if (sum && r) {
          var parts = [r.findings + " finding" + (r.findings === 1 ? "" : "s")];
          if (r.accepted) parts.push(r.accepted + " accepted");
          if (r.rejected) parts.push(r.rejected + " rejected");
          if (r.pending) parts.push(r.pending + " pending");
          sum.textContent = parts.join(", ");
          sum.className = "reviews" + (r.pending === 0 ? " reviewed" : "");
        }
      }).catch(function () { if (out) out.textContent = "Not saved: the node did not answer. Try again."; });
    });
  });
})();
