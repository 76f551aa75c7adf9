"""The report page's one inline script: search box, deep links and map interaction (DOM text only, no network)."""

from __future__ import annotations

import base64
import hashlib

#: Reads the JSON data block, never uses innerHTML (every name goes in as textContent) and sets
#: `src` only to the embedded `data:image/` thumbnails. Allowed by the page's CSP through its hash.
SCRIPT = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("flagsim-data").textContent);
  var n = D.names.length, k = D.k;
  // folded as `flagsim query` folds (catalog._fold_array): trimmed, NFC, lower case, final sigma
  function fold(s) { return s.trim().normalize("NFC").toLowerCase().replace(/\u03c2/g, "\u03c3"); }
  var lower = D.names.map(fold);
  var lowerIds = D.ids.map(fold);
  var input = document.getElementById("search");
  var list = document.getElementById("suggest");
  var out = document.getElementById("result");
  var status = document.getElementById("search-status");
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }
  function find(text) {
    // as `flagsim query` matches: the exact id (what deep links hold), the exact name, folded
    var t = text.trim(), q = fold(text);
    if (!t) { return -1; }
    var tries = [[D.ids, text], [D.names, text], [D.names, t], [lower, q], [lowerIds, q]];
    for (var j = 0; j < tries.length; j++) {
      var i = tries[j][0].indexOf(tries[j][1]);
      if (i >= 0) { return i; }
    }
    return -1;
  }
  function thumb(i) {
    var t = D.thumb[i];
    if (t === undefined || t < 0) { return null; }
    var uri = D.thumbs[t];
    if (typeof uri !== "string" || uri.indexOf("data:image/") !== 0) { return null; }
    var im = document.createElement("img");
    im.src = uri;
    im.alt = D.names[i];
    return im;
  }
  function go(i) { location.hash = "q=" + encodeURIComponent(D.ids[i]); }
  function neighbours(model, i) {
    var nb = D.nb[model], sc = D.sc[model], got = [];
    for (var r = 0; r < k; r++) {
      var p = nb[i * k + r];
      if (p >= 0) { got.push([p, sc[i * k + r] / 1000]); }
    }
    return got;
  }
  function show(i) {
    clear(out);
    out.setAttribute("data-image-id", D.ids[i]);
    var head = el("div", "rhead");
    var t = thumb(i);
    if (t) { head.appendChild(t); }
    head.appendChild(el("h3", "rname", D.names[i]));
    out.appendChild(head);
    D.models.forEach(function (m) {
      var row = el("div", m === D.ensemble ? "rrow ensemble" : "rrow");
      row.setAttribute("data-model", m);
      row.appendChild(el("span", "rmodel", m === D.ensemble ? m + " (ensemble)" : m));
      var hits = neighbours(m, i);
      if (!hits.length) { row.appendChild(el("span", "legend", "not in this model")); }
      hits.forEach(function (h, r) {
        var f = el("button", "rhit");
        f.type = "button";
        f.setAttribute("data-i", String(h[0]));
        var im = thumb(h[0]);
        if (im) { f.appendChild(im); }
        f.appendChild(el("span", "name", (r + 1) + ". " + D.names[h[0]]));
        f.appendChild(el("span", "score", h[1].toFixed(3)));
        f.addEventListener("click", function () { go(h[0]); });
        row.appendChild(f);
      });
      out.appendChild(row);
    });
    status.textContent = "";
  }
  function suggest(text) {
    clear(list);
    var q = fold(text);
    if (!q) { return; }
    var shown = 0;
    for (var i = 0; i < n && shown < 20; i++) {
      if (lower[i].indexOf(q) >= 0 || lowerIds[i] === q) {
        var b = el("button", "sugg", D.names[i]);
        b.type = "button";
        b.setAttribute("data-i", String(i));
        b.addEventListener("click", (function (j) { return function () { go(j); }; })(i));
        list.appendChild(b);
        shown++;
      }
    }
    status.textContent = shown ? "" : "no image matches";
  }
  input.addEventListener("input", function () {
    suggest(input.value);
    var i = find(input.value);
    if (i >= 0) { show(i); }
  });
  input.addEventListener("keydown", function (e) {
    if (e.key !== "Enter") { return; }
    var i = find(input.value);
    if (i < 0 && list.firstChild) { i = Number(list.firstChild.getAttribute("data-i")); }
    if (i >= 0) { go(i); }
  });
  function fromHash() {
    var h = location.hash;
    if (h.indexOf("#q=") !== 0) { return; }
    var q;
    try { q = decodeURIComponent(h.slice(3)); } catch (err) { q = h.slice(3); }
    var i = find(q);
    if (i < 0) { status.textContent = "no image is named " + q; return; }
    input.value = D.names[i];
    show(i);
    document.getElementById("search-section").scrollIntoView();
  }
  window.addEventListener("hashchange", fromHash);
  fromHash();
  Array.prototype.forEach.call(document.querySelectorAll("figure.map"), function (fig) {
    var model = fig.getAttribute("data-model"), info = fig.querySelector(".mapinfo");
    fig.addEventListener("click", function (e) {
      var c = e.target.closest("[data-i]");
      if (c) { go(Number(c.getAttribute("data-i"))); }
    });
    fig.addEventListener("mouseover", function (e) {
      var c = e.target.closest("circle[data-i]");
      if (!c) { return; }
      var i = Number(c.getAttribute("data-i"));
      var names = neighbours(model, i).map(function (h) { return D.names[h[0]]; });
      info.textContent = D.names[i] + (names.length ? " \u2192 " + names.join(", ") : "");
    });
  });
})();
"""


def script_hash(script: str = SCRIPT) -> str:
    """The CSP source allowing exactly `script` inline: `'sha256-<base64>'`."""
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"
