// Review workbench: one prompt at a time, keyboard first. Shipped with the package (no build).
// Keys: a / Enter confirm · 1 2 3 alternatives · i type an intent · o out of scope · s skip
//       u undo · n note · g whole near-duplicate group · r raw text (admins)
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const roundId = document.body.dataset.round;
  const isAdmin = document.body.dataset.admin === "true";
  const catalog = JSON.parse($("catalog").textContent);
  const known = new Set(catalog);
  const state = { item: null, note: "", group: false, busy: false, count: 0,
                  suggestions: [], active: 0, proposeName: null };
  if (!roundId) return;

  function raw() { return isAdmin && $("raw") && $("raw").checked; }

  function toast(text, bad) {
    const t = $("toast");
    t.textContent = text;
    t.className = "toast show" + (bad ? " bad" : "");
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.className = "toast"; }, 2200);
  }

  async function call(method, path, body) {
    const response = await fetch(path, {
      method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) { window.location.href = "/login?next=/review"; return null; }
    let data = {};
    try { data = await response.json(); } catch (e) { data = { error: response.statusText }; }
    return { status: response.status, ok: response.ok, data };
  }

  function pct(x) { return x === null || x === undefined ? "" : Math.round(x * 100) + " %"; }

  function setContext(id, text) {
    const el = $(id);
    el.hidden = !text;
    el.querySelector(".text").textContent = text || "";
  }

  function render(item) {
    state.item = item; state.note = ""; state.group = false; state.proposeName = null;
    $("intent-input").value = ""; hideSuggestions();
    $("note-box").hidden = true; $("note-shown").hidden = true;
    if (!item) { $("item").hidden = true; $("empty").hidden = false; return; }
    $("empty").hidden = true; $("item").hidden = false;
    $("item").dataset.itemId = item.item_id;
    $("prompt").textContent = item.text;
    setContext("previous", item.previous);
    setContext("next", item.next);
    $("predicted").textContent = item.predicted_intent;
    $("confidence").textContent = pct(item.confidence);
    const alts = $("alternatives");
    alts.replaceChildren();
    item.alternatives.forEach((alt, i) => {
      const li = document.createElement("li");
      const k = document.createElement("kbd"); k.textContent = String(i + 1);
      const b = document.createElement("b"); b.textContent = " " + alt.intent + " ";
      const c = document.createElement("span"); c.className = "conf"; c.textContent = pct(alt.confidence);
      li.append(k, b, c); li.dataset.intent = alt.intent;
      alts.append(li);
    });
    const outcome = $("outcome");
    outcome.replaceChildren();
    if (item.was_successful !== null) {
      const s = document.createElement("span");
      s.className = item.was_successful ? "succeeded" : "failed";
      s.textContent = "workflow " + (item.workflow_type || "") + (item.was_successful ? " succeeded" : " failed");
      outcome.append(s);
      if (item.execution_error) outcome.append(document.createTextNode(": " + item.execution_error));
    } else {
      outcome.textContent = "workflow outcome unknown";
    }
    const grouped = item.group_size > 1;
    $("group").hidden = !grouped; $("group-key").hidden = !grouped;
    $("group-size").textContent = String(item.group_size);
    renderGroup();
  }

  function renderGroup() {
    $("group").classList.toggle("on", state.group);
    $("group-mode").textContent = state.group
      ? "the next decision applies to the WHOLE group (g: this prompt only)"
      : "decisions apply to this prompt only (g: whole group)";
  }

  async function load() {
    const r = await call("GET", "/api/next?round=" + encodeURIComponent(roundId) + (raw() ? "&raw=true" : ""));
    if (r) render(r.data.item);
  }

  async function decide(action, intent) {
    if (!state.item || state.busy) return;
    state.busy = true;
    try {
      const body = { item_id: state.item.item_id, action, intent: intent || null,
                     notes: state.note || null, group: state.group, raw: raw() };
      const r = await call("POST", "/api/decide", body);
      if (!r) return;
      if (r.status === 422 && r.data.propose) {
        state.proposeName = intent;
        toast("“" + intent + "” is not in the catalogue: Enter again proposes it as a new intent", true);
        return;
      }
      if (!r.ok) {
        toast(r.data.error || "failed", true);
        if ("item" in r.data) render(r.data.item);
        return;
      }
      const res = r.data.result;
      state.count += 1; $("session-count").textContent = String(state.count);
      const what = res.action === "confirm" ? "confirmed" : res.action === "propose" ? "proposed" : "→";
      toast(what + " " + res.intent + (res.group_members ? " (+" + res.group_members + " in group)" : "") +
            (res.final ? "" : res.state === "pending" ? " · second review pending" : " · " + res.state));
      render(r.data.item);
    } finally { state.busy = false; }
  }

  async function skip() {
    if (!state.item || state.busy) return;
    state.busy = true;
    try {
      const r = await call("POST", "/api/skip", { item_id: state.item.item_id, raw: raw() });
      if (!r) return;
      if (!r.ok) toast(r.data.error || "failed", true); else toast("skipped");
      render(r.data.item);
    } finally { state.busy = false; }
  }

  async function undo() {
    if (state.busy) return;
    state.busy = true;
    try {
      const r = await call("POST", "/api/undo", { round_id: roundId, raw: raw() });
      if (!r) return;
      if (!r.ok) { toast(r.data.error || "nothing to undo", true); return; }
      state.count = Math.max(0, state.count - 1); $("session-count").textContent = String(state.count);
      toast("undone");
      render(r.data.item);
    } finally { state.busy = false; }
  }

  async function saveNote(text) {
    if (!state.item || !text.trim()) return;
    const r = await call("POST", "/api/note", { item_id: state.item.item_id, text });
    if (r && r.ok) {
      state.note = text.trim();
      $("note-shown").textContent = "note: " + state.note; $("note-shown").hidden = false;
      toast("note kept: it goes with your decision");
    } else if (r) toast(r.data.error || "note not saved", true);
  }

  // Type-ahead over the model's catalogue.
  function matches(text) {
    const q = text.trim().toLowerCase();
    if (!q) return [];
    const starts = catalog.filter((c) => c.toLowerCase().startsWith(q));
    const inside = catalog.filter((c) => !c.toLowerCase().startsWith(q) && c.toLowerCase().includes(q));
    return starts.concat(inside).slice(0, 8);
  }
  function hideSuggestions() { $("suggestions").replaceChildren(); state.suggestions = []; state.active = 0; }
  function showSuggestions() {
    const list = $("suggestions");
    list.replaceChildren();
    state.suggestions.forEach((name, i) => {
      const li = document.createElement("li");
      li.textContent = name; li.setAttribute("role", "option");
      if (i === state.active) li.className = "active";
      li.addEventListener("mousedown", (e) => { e.preventDefault(); pickTyped(name); });
      list.append(li);
    });
    const typed = $("intent-input").value.trim();
    if (typed && !known.has(typed) && !state.suggestions.length) {
      const li = document.createElement("li");
      li.className = "new"; li.textContent = "new intent: " + typed + " (needs an admin)";
      list.append(li);
    }
  }
  function pickTyped(name) {
    const input = $("intent-input");
    input.value = ""; hideSuggestions(); input.blur();
    if (known.has(name)) { decide("correct", name); return; }
    if (state.proposeName === name) { decide("propose", name); return; }
    decide("correct", name);  // the server answers 422; a second Enter proposes
  }
  $("intent-input").addEventListener("input", () => {
    state.suggestions = matches($("intent-input").value); state.active = 0; state.proposeName = null;
    showSuggestions();
  });
  $("intent-input").addEventListener("keydown", (e) => {
    const input = $("intent-input");
    if (e.key === "ArrowDown") { state.active = Math.min(state.active + 1, state.suggestions.length - 1); showSuggestions(); e.preventDefault(); }
    else if (e.key === "ArrowUp") { state.active = Math.max(state.active - 1, 0); showSuggestions(); e.preventDefault(); }
    else if (e.key === "Tab" && state.suggestions.length) { input.value = state.suggestions[state.active]; e.preventDefault(); }
    else if (e.key === "Escape") { input.value = ""; hideSuggestions(); input.blur(); }
    else if (e.key === "Enter") {
      e.preventDefault();
      const typed = input.value.trim();
      if (!typed && state.proposeName) { pickTyped(state.proposeName); return; }
      if (!typed) return;
      const exact = catalog.find((c) => c === typed);
      const choice = exact || (state.suggestions.length ? state.suggestions[state.active] : typed);
      if (!exact && !state.suggestions.length) {
        if (state.proposeName === typed) { input.value = ""; hideSuggestions(); input.blur(); decide("propose", typed); }
        else { state.proposeName = typed; toast("“" + typed + "” is not in the catalogue: Enter again proposes it as a new intent", true); }
        return;
      }
      pickTyped(choice);
    }
    e.stopPropagation();
  });
  $("note-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); const t = $("note-input").value; $("note-box").hidden = true; $("note-input").blur(); saveNote(t); }
    else if (e.key === "Escape") { $("note-box").hidden = true; $("note-input").value = ""; $("note-input").blur(); }
    e.stopPropagation();
  });
  if ($("raw")) $("raw").addEventListener("change", load);

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const tag = (e.target && e.target.tagName) || "";
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
    const key = e.key;
    let handled = true;
    if (key === "a" || key === "Enter") decide("confirm");
    else if (key === "1" || key === "2" || key === "3") {
      const alt = state.item && state.item.alternatives[Number(key) - 1];
      if (alt) decide("correct", alt.intent); else toast("no alternative " + key, true);
    }
    else if (key === "o") decide("out_of_scope");
    else if (key === "s") skip();
    else if (key === "u") undo();
    else if (key === "i" || key === "/") { $("intent-input").focus(); }
    else if (key === "n") { $("note-box").hidden = false; $("note-input").value = state.note; $("note-input").focus(); }
    else if (key === "g") { if (state.item && state.item.group_size > 1) { state.group = !state.group; renderGroup(); } }
    else if (key === "r" && $("raw")) { $("raw").checked = !$("raw").checked; load(); }
    else handled = false;
    if (handled) e.preventDefault();
  });

  load();
})();
