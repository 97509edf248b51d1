/* Mailroom dashboard: live figures and confirmations. Optional: without this script the
   page is complete, its forms work and destructive ones ask on a page of their own. */
(function () {
  "use strict";

  // Destructive controls: ask here, and tell the server it was asked (confirmed=yes).
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (!question) {
      return;
    }
    if (!window.confirm(question)) {
      event.preventDefault();
      return;
    }
    var field = form.querySelector("input[name=confirmed]");
    if (!field) {
      field = document.createElement("input");
      field.type = "hidden";
      field.name = "confirmed";
      form.appendChild(field);
    }
    field.value = "yes";
  });

  var root = document.querySelector("[data-live-url]");
  if (!root || !window.fetch) {
    return;
  }
  var url = root.getAttribute("data-live-url");
  var interval = parseInt(root.getAttribute("data-poll-ms"), 10) || 2000;
  var updated = root.querySelector("[data-updated]");
  var state = root.querySelector("[data-live-state]");
  var timer = null;
  var busy = false;
  var stopped = false;
  var shown = {};

  function say(text, stale) {
    state.textContent = text;
    state.className = "live-state" + (stale ? " stale" : "");
  }

  var pressing = false;
  document.addEventListener("pointerdown", function () { pressing = true; });
  document.addEventListener("pointerup", function () { pressing = false; });
  document.addEventListener("pointercancel", function () { pressing = false; });

  // The CSRF token is masked afresh in every answer: it is no change.
  function comparable(html) {
    return html.replace(/name="csrfmiddlewaretoken" value="[^"]*"/g, "");
  }

  // Swap a section that changed, keeping keyboard focus on the same control. Not while
  // a button is being pressed: the click would land on a control that is gone.
  function swap(section, html) {
    var name = section.getAttribute("data-live");
    var next = comparable(html);
    if (shown[name] === next || pressing) {
      return;
    }
    var active = document.activeElement;
    var focusId = active && section.contains(active) ? active.id : "";
    var open = [];
    var details = section.querySelectorAll("details[open][id]");
    for (var i = 0; i < details.length; i++) {
      open.push(details[i].id);
    }
    section.innerHTML = html;
    shown[name] = next;
    for (var j = 0; j < open.length; j++) {
      var again = document.getElementById(open[j]);
      if (again) {
        again.open = true;
      }
    }
    var focused = focusId ? document.getElementById(focusId) : null;
    if (focused) {
      focused.focus();
    }
  }

  function apply(data) {
    var sections = root.querySelectorAll("[data-live]");
    for (var i = 0; i < sections.length; i++) {
      var html = data.html[sections[i].getAttribute("data-live")];
      if (typeof html === "string") {
        swap(sections[i], html);
      }
    }
    var at = new Date(data.generated_at);
    updated.textContent = "As of " + at.toISOString().slice(11, 19) + " UTC";
    say("live", false);
  }

  function schedule() {
    clearTimeout(timer);
    if (!stopped && !document.hidden) {
      timer = setTimeout(poll, interval);
    }
  }

  function poll() {
    if (busy || stopped || document.hidden) {
      return;
    }
    busy = true;
    fetch(url, { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (response) {
        var type = response.headers.get("Content-Type") || "";
        if (response.redirected || response.status === 403 || type.indexOf("application/json") !== 0) {
          // Signed out (the session ended) or no longer staff: stop asking.
          stopped = true;
          say("Not updating: your session has ended. Reload the page to sign in again.", true);
          return null;
        }
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (data) {
        if (data) {
          apply(data);
        }
      })
      .catch(function () {
        say("Not updating: the server does not answer. Retrying…", true);
      })
      .then(function () {
        busy = false;
        schedule();
      });
  }

  // Nothing is fetched while the tab is hidden; back in view, refresh at once.
  document.addEventListener("visibilitychange", function () {
    if (document.hidden) {
      clearTimeout(timer);
    } else {
      poll();
    }
  });

  say("live", false);
  schedule();
})();
