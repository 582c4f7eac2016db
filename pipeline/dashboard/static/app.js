// pipeline dashboard: times (of <time> and <option data-datetime>) in the viewer's zone, confirmations, a run's steps live (SSE).
(function () {
  "use strict";
  function ago(date) {
    var s = Math.max(0, Math.round((Date.now() - date.getTime()) / 1000));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " days ago";
  }
  // <time datetime="ISO UTC">: shown in the browser's time zone, or as "5 min ago".
  function localize(root) {
    var times = (root || document).querySelectorAll("time[datetime]");
    for (var i = 0; i < times.length; i++) {
      var t = times[i];
      var d = new Date(t.getAttribute("datetime"));
      if (isNaN(d.getTime())) continue;
      t.title = d.toLocaleString();
      t.textContent = t.hasAttribute("data-ago") ? ago(d) : d.toLocaleString();
    }
    // An <option> holds text only: its time comes from data-datetime, after data-label.
    var options = (root || document).querySelectorAll("option[data-datetime]");
    for (var j = 0; j < options.length; j++) {
      var o = options[j];
      var od = new Date(o.getAttribute("data-datetime"));
      if (isNaN(od.getTime())) continue;
      o.textContent = (o.getAttribute("data-label") || "") + " · " + od.toLocaleString();
    }
  }
  document.addEventListener("DOMContentLoaded", function () {
    localize(document);
    document.addEventListener("htmx:afterSettle", function (e) { localize(e.target); });
    document.addEventListener("submit", function (e) {
      var msg = e.target.getAttribute("data-confirm");
      if (msg && !window.confirm(msg)) e.preventDefault();
    });
    var live = document.querySelector("[data-live]");
    if (live && window.EventSource) {
      var source = new EventSource(live.getAttribute("data-live"));
      source.addEventListener("update", function (e) {
        live.innerHTML = e.data;
        localize(live);
      });
      source.addEventListener("done", function () { source.close(); });
    }
  });
})();
