// Shared by the pages (the server puts it in place of the COMMON marker): the token from the link, and a
// submission resent with the same id until the server says saved (it stores it once however often it arrives).
const token = new URLSearchParams(location.search).get("token");
const headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"};

function text(el, s) { el.textContent = s; return el; }
function promptText(p) { return typeof p === "string" ? p : p.map(m => m.role + ": " + m.content).join("\n"); }

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
