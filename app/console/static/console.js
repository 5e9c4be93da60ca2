// queue-worker console: refreshes the overview every few seconds, asks before a purge.
// Served by the service itself (no CDN, no build step); the page works without it.
"use strict";
(function () {
  var REFRESH_MS = 3000;
  var box = document.getElementById("overview");
  function refresh() {
    if (!box || document.hidden || box.contains(document.activeElement)) {
      return;
    }
    fetch(box.getAttribute("data-refresh"), { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (response.status === 401) {
          window.location.assign("/console/login");
          return null;
        }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        // The server rendered and escaped this fragment; it is this page's own markup.
        if (html !== null && html !== undefined) {
          box.innerHTML = html;
          box.setAttribute("data-refreshed", String(Date.now()));
        }
      })
      .catch(function () { /* offline for a moment: try again next time */ });
  }
  window.setInterval(refresh, REFRESH_MS);
  var bulk = document.getElementById("bulk");
  if (bulk) {
    bulk.addEventListener("submit", function (event) {
      var button = event.submitter;
      if (button && button.value === "purge" &&
          !window.confirm("Delete every dead letter that matches? This cannot be undone.")) {
        event.preventDefault();
      }
    });
  }
})();
