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

  // Key-image slice scrolling without reloading the page.
  var scroller = document.querySelector(".scroller[data-finding]");
  if (scroller) {
    var img = document.getElementById("axial-image");
    var label = document.getElementById("slice-label");
    var finding = scroller.getAttribute("data-finding");
    var offset = parseInt(scroller.getAttribute("data-offset") || "0", 10);
    var zoom = parseInt(scroller.getAttribute("data-zoom") || "1", 10);
    var busy = false, wanted = null;
    var zoomLinks = document.querySelectorAll("a.zoom[data-zoom]");
    function setZoom(z) {
      zoom = z;
      zoomLinks.forEach(function (a) { a.setAttribute("aria-pressed", String(a.getAttribute("data-zoom") === String(z))); });
      document.querySelectorAll(".reformats img[data-plane]").forEach(function (im) {
        im.src = "/api/findings/" + finding + "/image?plane=" + im.getAttribute("data-plane") + "&zoom=" + z;
      });
      show(offset, true);
    }
    zoomLinks.forEach(function (a) {
      a.addEventListener("click", function (e) { e.preventDefault(); setZoom(parseInt(a.getAttribute("data-zoom"), 10)); });
    });
    function show(next, force) {
      if (next === offset && !force && wanted === null) return;
      wanted = next;
      if (busy) return;
      busy = true;
      var target = wanted;
      var url = "/api/findings/" + finding + "/image?plane=axial&offset=" + target + "&zoom=" + zoom;
      fetch(url, { credentials: "same-origin" }).then(function (r) {
        if (!r.ok) throw new Error("image " + r.status);
        var idx = parseInt(r.headers.get("X-Slice-Index"), 10), count = parseInt(r.headers.get("X-Slice-Count"), 10);
        return r.blob().then(function (b) {
          var old = img.src; img.src = URL.createObjectURL(b);
          if (old.indexOf("blob:") === 0) URL.revokeObjectURL(old);
          offset = target;
          label.textContent = (target === 0 ? "nodule centre" : (target > 0 ? "+" : "") + target + " slices") +
            (isNaN(idx) ? "" : " · slice " + (idx + 1) + " of " + count);
        });
      }).catch(function () {}).then(function () {
        busy = false;
        if (wanted !== target) { show(wanted, true); } else { wanted = null; }
      });
    }
    function step(d) { show((wanted !== null ? wanted : offset) + d); }
    document.getElementById("slice-prev").addEventListener("click", function (e) { e.preventDefault(); step(-1); });
    document.getElementById("slice-next").addEventListener("click", function (e) { e.preventDefault(); step(1); });
    document.getElementById("slice-centre").addEventListener("click", function (e) { e.preventDefault(); show(0); });
    img.addEventListener("keydown", function (e) {
      var d = { ArrowUp: -1, ArrowDown: 1, PageUp: -5, PageDown: 5, k: -1, j: 1 }[e.key];
      if (e.key === "Home") { e.preventDefault(); show(0); return; }
      if (e.key === "z" || e.key === "Z") { e.preventDefault(); setZoom(zoom === 1 ? 2 : zoom === 2 ? 4 : 1); return; }
      if (d) { e.preventDefault(); step(d); }
    });
    img.addEventListener("wheel", function (e) { e.preventDefault(); step(e.deltaY > 0 ? 1 : -1); }, { passive: false });
  }
})();
