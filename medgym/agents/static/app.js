// medgym chat page: upload, ask, render streamed steps; the session id lives in location.hash.
"use strict";
const $ = (id) => document.getElementById(id);
let sessionId = null;
let uploadId = null;

function imgUrl(hash) { return "/api/images/" + hash + ".png"; }

function sessionFromHash() {
  const m = location.hash.match(/s=([0-9a-f]{32})/);
  return m ? m[1] : null;
}

function setSession(id) {
  sessionId = id;
  if (id) { history.replaceState(null, "", "#s=" + id); localStorage.setItem("medgym-session", id); }
  $("session-info").textContent = id ? "session " + id : "";
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function addImages(box, hashes, alt) {
  if (!hashes || !hashes.length) return;
  const row = el("div", "images");
  for (const h of hashes) {
    const img = el("img");
    img.src = imgUrl(h);
    img.alt = alt;
    row.appendChild(img);
  }
  box.appendChild(row);
}

const LABELS = { question: "question", turn: "model turn", tool: "tool", format_error: "format error",
  result: "answer", error: "error", budget: "stopped" };

function render(ev) {
  if (!ev || !ev.kind || ev.kind === "done" || ev.kind === "session") return;
  if (ev.kind === "note") {
    // a note for the user about the answer just shown (e.g. the embedded policy on a real image)
    const results = document.querySelectorAll("#conversation .msg.result");
    const target = results.length ? results[results.length - 1] : $("conversation");
    target.appendChild(el("div", "note-for-user", ev.content));
    return;
  }
  const box = el("div", "msg " + ev.kind + (ev.error ? " failed" : ""));
  box.dataset.kind = ev.kind;
  let label = LABELS[ev.kind] || ev.kind;
  if (ev.kind === "tool") label += " · " + ev.name + (ev.error ? " (error)" : "");
  if (ev.kind === "turn" && ev.model_id) label += " · " + ev.model_id;
  box.appendChild(el("div", "label", label));
  if (ev.kind === "result") {
    box.appendChild(el("div", "answer", ev.answer == null ? "No answer." : ev.answer));
    if (ev.reliability && ev.reliability.score != null) {
      box.appendChild(el("div", "reliability",
        "reliability " + ev.reliability.score.toFixed(2) + " (" + ev.reliability.n + " sampled runs)"));
    }
    if (ev.box) box.appendChild(el("div", "small", "box " + JSON.stringify(ev.box)));
    addImages(box, ev.overlay ? [ev.overlay] : [], "answer overlay");
    box.querySelectorAll("img").forEach((i) => i.classList.add("overlay"));
  } else {
    const text = ev.kind === "question" && ev.asked ? ev.asked : ev.content;
    box.appendChild(el("pre", "", text));
    addImages(box, ev.images, ev.kind === "tool" ? ev.name + " result" : "image");
    if (ev.kind === "tool") box.querySelectorAll("img").forEach((i) => i.classList.add("tool-image"));
  }
  $("conversation").appendChild(box);
  box.scrollIntoView({ block: "end" });
}

function showStatus(text, cls) {
  const status = $("upload-status");
  status.className = cls || "";
  status.textContent = text;
}

// A server started with a token answers /api/ only with it: the cookie set by opening /?token=...
// travels with every fetch and <img> of this page. Without it, say how to get in.
async function checkAccess() {
  const r = await fetch("/api/sessions");
  if (r.status === 401) { showStatus((await r.json()).error, "error"); return false; }
  return true;
}

async function loadHistory(id) {
  const r = await fetch("/api/sessions/" + id);
  if (r.status === 401) { showStatus((await r.json()).error, "error"); return; }
  if (!r.ok) { setSession(null); return; }
  const data = await r.json();
  $("conversation").innerHTML = "";
  setSession(id);
  for (const m of data.messages) render(m);
}

async function upload(file) {
  showStatus("uploading " + file.name, "running");
  const fd = new FormData();
  fd.append("file", file);
  let r, data;
  try {
    r = await fetch("/api/upload", { method: "POST", body: fd });
    data = await r.json();
  } catch (e) {  // the server closes the connection on a body over its limit
    showStatus("Upload failed (" + e + "). A file over the size limit is refused: upload one series or slice.", "error");
    uploadId = null;
    return;
  }
  if (!r.ok) { showStatus(data.error, "error"); uploadId = null; return; }
  uploadId = data.upload_id;
  showStatus(`${data.modality} image ${data.width} x ${data.height}` + (data.slices > 1 ? `, ${data.slices} slices` : ""));
  $("preview").src = imgUrl(data.preview);
  $("preview").hidden = false;
  setSession(null);
  $("conversation").innerHTML = "";
}

async function ask(ev) {
  ev.preventDefault();
  const body = { question: $("question").value, reliability_n: Number($("reliability").value || 0) };
  if (sessionId) body.session_id = sessionId;
  else if (uploadId) body.upload_id = uploadId;
  else if ($("case-seed").value !== "") body.case_seed = Number($("case-seed").value);
  $("ask").disabled = true;
  $("ask").classList.add("running");
  try {
    const r = await fetch("/api/chat", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!r.ok) { render({ kind: "error", content: (await r.json()).error }); return; }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (!line.trim()) continue;
        const event = JSON.parse(line);
        if (event.kind === "session") setSession(event.session_id);
        else render(event);
      }
    }
    $("question").value = "";
  } catch (e) {
    render({ kind: "error", content: "Connection lost: " + e });
  } finally {
    $("ask").disabled = false;
    $("ask").classList.remove("running");
  }
}

$("file").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files[0]); });
$("ask-form").addEventListener("submit", ask);
$("new-session").addEventListener("click", () => {
  setSession(null); uploadId = null; history.replaceState(null, "", "#");
  $("conversation").innerHTML = ""; $("preview").hidden = true; $("upload-status").textContent = "";
});
const initial = sessionFromHash() || localStorage.getItem("medgym-session");
checkAccess().then((ok) => { if (ok && initial) loadHistory(initial); });
