// Shared by the pages (the server puts it in place of the COMMON marker): the token from the link, and a
// submission resent with the same id until the server says saved (it stores it once however often it arrives).
const token = new URLSearchParams(location.search).get("token");
const headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"};

function text(el, s) { el.textContent = s; return el; }
function promptText(p) { return typeof p === "string" ? p : p.map(m => m.role + ": " + m.content).join("\n"); }

// A submission id. crypto.randomUUID exists only in secure contexts (https, localhost): a labeler opening
// http://host:8765 gets none, so the id is made from crypto.getRandomValues, which every context has.
function newId() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, x => x.toString(16).padStart(2, "0")).join("");
}

// What went wrong, and what to do about it, in the labeler's words.
function explain(e) {
  if (e instanceof TypeError) return "not saved: the server cannot be reached. Check your connection, then submit again.";
  return "not saved: " + e.message;
}

async function send(path, body) {
  for (let attempt = 0; ; attempt++) {
    try {
      const r = await fetch(path, {method: "POST", headers, body: JSON.stringify(body)});
      const data = await r.json();
      if (r.ok) return data;
      throw new Error(data.detail || r.statusText);
    } catch (e) {
      if (e instanceof TypeError && attempt < 20) { await new Promise(res => setTimeout(res, 500)); continue; }
      throw e;
    }
  }
}

async function nextItem() {
  const r = await fetch("/api/next", {headers});
  if (!r.ok) throw new Error((await r.json()).detail || r.statusText);
  return r.json();
}

// Work in progress survives a reload: kept in this browser per labeler and item, dropped once saved.
const draftKey = itemId => "rlhf-engine draft " + token + " " + itemId;
function saveDraft(itemId, draft) { try { localStorage.setItem(draftKey(itemId), JSON.stringify(draft)); } catch (e) {} }
function loadDraft(itemId) { try { return JSON.parse(localStorage.getItem(draftKey(itemId)) || "null"); } catch (e) { return null; } }
function dropDraft(itemId) { try { localStorage.removeItem(draftKey(itemId)); } catch (e) {} }

// The next item to `showItem(data)`, or the end of the queue (`showItem(null)` after the message); a failed
// request says so and leaves the page as it is.
async function loadNext(endMessage, showItem) {
  let data;
  try { data = await nextItem(); }
  catch (e) { text(document.getElementById("status"), explain(e) + " (reload the page)"); return; }
  if (!data.item) { endOfQueue(endMessage); showItem(null); return; }
  showItem(data);
}

// A new item starts with its controls shown and nothing focused: Enter on the Skip button pressed for the last
// item must not skip this one.
function beginItem() {
  if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
  document.querySelectorAll(".during").forEach(el => { el.hidden = false; });
}

// Where the queue ends: the item and its buttons go, the message stays.
function endOfQueue(message) {
  document.querySelectorAll(".during").forEach(el => { el.hidden = true; });
  text(document.getElementById("prompt"), message);
  text(document.getElementById("remaining"), "0 left for you");
}

function short(s) { s = promptText(s); return s.length > 60 ? s.slice(0, 60) + "\u2026" : s; }
