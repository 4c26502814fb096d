// Live pages: a <main data-live="N"> is fetched again every N seconds and swapped in, so state,
// progress and job lines move without a reload. Pages work without this script.
(function () {
  "use strict";
  function refresh() {
    var main = document.querySelector("main[data-live]");
    if (!main) { return; }
    var seconds = parseFloat(main.getAttribute("data-live")) || 3;
    setTimeout(function () {
      // Leave a page alone while the person types in one of its forms.
      var active = document.activeElement;
      if (active && main.contains(active) && (active.tagName === "INPUT" || active.tagName === "SELECT")) { refresh(); return; }
      fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (answer) {
          if (answer.redirected || !answer.ok) { throw new Error("status " + answer.status); }
          return answer.text();
        })
        .then(function (html) {
          var next = new DOMParser().parseFromString(html, "text/html").querySelector("main");
          if (next) { main.replaceWith(document.importNode(next, true)); }
          refresh();
        })
        .catch(function () { setTimeout(refresh, 5000); });
    }, seconds * 1000);
  }
  document.addEventListener("DOMContentLoaded", refresh);
})();
