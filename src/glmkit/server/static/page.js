"use strict";
// glmkit's chat page: conversations and settings in the browser's storage, replies streamed from
// /v1/chat/completions, markdown rendered by marked + DOMPurify + highlight.js + KaTeX (vendored).
const $ = (id) => document.getElementById(id);
const store = { get: (k, d) => { try { return JSON.parse(localStorage.getItem(k)) ?? d; } catch { return d; } },
                set: (k, v) => localStorage.setItem(k, JSON.stringify(v)) };
let chats = store.get("glmkit.chats", []);
let current = store.get("glmkit.current", null);
let settings = store.get("glmkit.settings", {});
let controller = null;
let pending = [];  // data: URLs of the images that go with the next message
const FIELDS = ["temperature", "top_p", "top_k", "min_p", "max_tokens"];

// ---------------------------------------------------------------- theme, layout, settings
const dark = matchMedia("(prefers-color-scheme: dark)");
function applyTheme() {
  const choice = store.get("glmkit.theme", "system"), isDark = choice === "dark" || (choice === "system" && dark.matches);
  document.documentElement.dataset.theme = isDark ? "dark" : "light";
  $("hljs-dark").disabled = !isDark; $("hljs-light").disabled = isDark;
  $("theme").title = `theme: ${choice} (click for the next)`;
}
dark.addEventListener("change", applyTheme);
$("theme").onclick = () => {
  const order = ["system", "dark", "light"], now = store.get("glmkit.theme", "system");
  store.set("glmkit.theme", order[(order.indexOf(now) + 1) % 3]); applyTheme();
};
const narrow = () => matchMedia("(max-width: 760px)").matches;
$("menu").onclick = () => document.body.classList.toggle(narrow() ? "open" : "collapsed");
$("scrim").onclick = () => document.body.classList.remove("open");
$("gear").onclick = () => $("settings").classList.toggle("open");
function loadSettings() {
  for (const f of FIELDS) $(`s-${f}`).value = settings[f] ?? "";
  $("s-key").value = settings.key || "";
}
for (const f of [...FIELDS, "key"]) $(`s-${f}`).onchange = () => {
  const v = $(`s-${f}`).value.trim(); if (v === "") delete settings[f]; else settings[f] = f === "key" ? v : Number(v);
  store.set("glmkit.settings", settings);
};
$("s-system").oninput = () => { const c = chat(); if (c) { c.system = $("s-system").value; save(); } };
function headers() {
  const h = { "Content-Type": "application/json" };
  if (settings.key) h.Authorization = `Bearer ${settings.key}`;
  return h;
}
async function modelName() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    const body = await res.json();
    $("model").textContent = res.ok ? (body.data?.[0]?.id || "glmkit") : "glmkit (check the API key in ⚙)";
  } catch { $("model").textContent = "glmkit (server unreachable)"; }
}

// ---------------------------------------------------------------- conversations
function chat() { return chats.find((c) => c.id === current); }
function save() {  // the browser's storage is small: a conversation with many images may not fit
  try { store.set("glmkit.chats", chats); store.set("glmkit.current", current); }
  catch { status("(this conversation is too large to keep in the browser's storage)", true); }
}
function status(text, bad = false) { $("status").textContent = text; $("status").className = bad ? "bad" : ""; }
function newChat() {
  const c = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat", system: "", messages: [] };
  chats.unshift(c); current = c.id; save(); render();
}
function renderList() {
  $("list").innerHTML = "";
  const q = $("search").value.trim().toLowerCase();
  for (const c of chats) {
    if (q && !(c.title.toLowerCase().includes(q) || c.messages.some((m) => textOf(m.content).toLowerCase().includes(q)))) continue;
    const li = document.createElement("li"), span = document.createElement("span");
    span.textContent = c.title; li.className = c.id === current ? "active" : "";
    const rename = button("✎", "rename", () => { const t = prompt("Rename the conversation", c.title); if (t) { c.title = t; save(); renderList(); } });
    const del = button("🗑", "delete", () => { if (confirm(`Delete "${c.title}"?`)) { chats = chats.filter((x) => x !== c);
      if (current === c.id) current = chats[0]?.id ?? null; save(); render(); } });
    li.append(span, rename, del);
    li.onclick = (e) => { if (e.target === li || e.target === span) { current = c.id; save(); render(); document.body.classList.remove("open"); } };
    $("list").appendChild(li);
  }
}
function button(text, title, onclick) {
  const b = document.createElement("button"); b.textContent = text; b.title = title; b.type = "button";
  b.className = "icon"; b.onclick = (e) => { e.stopPropagation(); onclick(); }; return b;
}
$("search").oninput = renderList;
$("new").onclick = () => { newChat(); document.body.classList.remove("open"); };
$("export").onclick = () => {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(chats, null, 1)], { type: "application/json" }));
  a.download = "glmkit-conversations.json"; a.click();
};
$("import").onclick = () => $("importfile").click();
$("importfile").onchange = async () => {
  try {
    const got = JSON.parse(await $("importfile").files[0].text());
    const valid = (Array.isArray(got) ? got : [got]).filter((c) => c && Array.isArray(c.messages));
    for (const c of valid) chats.unshift({ id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6),
      title: String(c.title || "Imported"), system: String(c.system || ""), messages: c.messages });
    status(`imported ${valid.length} conversation(s)`); save(); render();
  } catch (e) { status(`could not import: ${e.message}`, true); }
  $("importfile").value = "";
};

// ---------------------------------------------------------------- messages
const textOf = (content) => typeof content === "string" ? content :
  (content || []).filter((p) => p.type === "text").map((p) => p.text).join("");
const imagesOf = (content) => typeof content === "string" ? [] :
  (content || []).filter((p) => p.type === "image_url").map((p) => p.image_url.url);
function markdown(src) {
  const math = [];  // formulas are set aside before markdown sees them, then typeset by KaTeX
  const keep = (tex, display) => { math.push([tex, display]); return `@@MATH${math.length - 1}@@`; };
  src = src.replace(/\$\$([\s\S]+?)\$\$/g, (_, t) => keep(t, true)).replace(/\\\[([\s\S]+?)\\\]/g, (_, t) => keep(t, true))
           .replace(/\\\(([\s\S]+?)\\\)/g, (_, t) => keep(t, false)).replace(/(^|[^\\$])\$([^$\n]+?)\$/g, (_, a, t) => a + keep(t, false));
  let html = DOMPurify.sanitize(marked.parse(src, { gfm: true, breaks: true }));
  return html.replace(/@@MATH(\d+)@@/g, (_, i) => katex.renderToString(math[+i][0], { displayMode: math[+i][1], throwOnError: false }));
}
function decorate(body) {  // highlighted code with its language and a copy button
  for (const code of body.querySelectorAll("pre code")) {
    hljs.highlightElement(code);
    const lang = (code.className.match(/language-([\w+#-]+)/) || [])[1] || "code";
    const bar = document.createElement("div"), label = document.createElement("span");
    bar.className = "codebar"; label.textContent = lang;
    bar.append(label, button("copy", "copy the code", () => navigator.clipboard?.writeText(code.textContent)));
    bar.lastChild.className = "copy";
    code.parentElement.prepend(bar);
  }
}
function addBubble(role, index) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.innerHTML = `<div class="who"><span>${role === "user" ? "You" : "Assistant"}</span><span class="actions"></span></div>` +
    `<details class="think" hidden><summary>Reasoning</summary><div class="reasoning"></div></details>` +
    `<div class="images"></div><div class="body"></div><div class="calls"></div><div class="stats"></div>`;
  if (index !== undefined) actions(div, role, index);
  $("log").appendChild(div); $("log").scrollTop = $("log").scrollHeight;
  return div;
}
function actions(div, role, i) {
  const bar = div.querySelector(".actions"), c = chat(), m = c.messages[i];
  bar.append(button("copy", "copy the text", () => navigator.clipboard?.writeText(textOf(m.content))));
  if (role === "user") bar.append(button("edit", "edit and send again (later messages go)", () => {
    const text = prompt("Edit the message", textOf(m.content)); if (text === null || controller) return;
    const parts = imagesOf(m.content).map((url) => ({ type: "image_url", image_url: { url } }));
    c.messages = c.messages.slice(0, i); c.messages.push({ role: "user", content: parts.length ? [...parts, { type: "text", text }] : text });
    save(); render(); reply();
  }));
  if (role === "assistant" && i === c.messages.length - 1) bar.append(button("regenerate", "write this reply again", () => {
    if (controller) return; c.messages.pop(); save(); render(); reply();
  }));
  bar.append(button("delete", "delete this message", () => { c.messages.splice(i, 1); save(); render(); }));
  for (const b of bar.children) b.className = b.textContent;
}
function fill(div, m, thinking = false) {
  const think = div.querySelector("details.think");
  think.hidden = !m.reasoning_content; think.open = thinking;
  div.querySelector(".reasoning").textContent = m.reasoning_content || "";
  const images = div.querySelector(".images"); images.innerHTML = "";
  for (const url of imagesOf(m.content)) { const img = document.createElement("img"); img.src = url; img.alt = "image"; images.appendChild(img); }
  const body = div.querySelector(".body");
  if (m.role === "user") body.textContent = textOf(m.content);
  else { body.innerHTML = markdown(textOf(m.content)); decorate(body); }
  div.querySelector(".calls").innerHTML = "";
  for (const call of m.tool_calls || []) {
    const d = document.createElement("div"); d.textContent = `🔧 ${call.function.name}(${call.function.arguments || ""})`;
    div.querySelector(".calls").appendChild(d);
  }
  div.querySelector(".stats").textContent = m.stats || "";
  if (m.note) { const n = document.createElement("div"); n.className = "note"; n.textContent = m.note; body.appendChild(n); }
}
function render() {
  renderList();
  const c = chat();
  $("s-system").value = c ? c.system : "";
  $("log").innerHTML = "";
  (c ? c.messages : []).forEach((m, i) => fill(addBubble(m.role, i), m));
}

// ---------------------------------------------------------------- images
function showPending() {
  $("pending").innerHTML = "";
  pending.forEach((url, i) => {
    const span = document.createElement("span"), img = document.createElement("img");
    img.src = url; img.alt = "attached image";
    span.append(img, button("×", "remove", () => { pending.splice(i, 1); showPending(); })); $("pending").appendChild(span);
  });
}
function attach(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    const reader = new FileReader();
    reader.onload = () => { pending.push(reader.result); showPending(); };
    reader.readAsDataURL(file);
  }
}
$("attach").onclick = () => $("file").click();
$("file").onchange = () => { attach($("file").files); $("file").value = ""; };
$("input").addEventListener("paste", (e) => { if (e.clipboardData?.files?.length) { e.preventDefault(); attach(e.clipboardData.files); } });

// ---------------------------------------------------------------- sending and streaming
$("stop").onclick = () => controller && controller.abort();
$("input").addEventListener("keydown", (e) => {   // Enter sends, except while an input method is composing
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) { e.preventDefault(); $("form").requestSubmit(); }
});
$("form").onsubmit = (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if ((!text && !pending.length) || controller) return;
  if (!chat()) newChat();
  const c = chat(), parts = pending.map((url) => ({ type: "image_url", image_url: { url } }));
  c.messages.push({ role: "user", content: parts.length ? [...parts, { type: "text", text }] : text });
  if (c.title === "New chat") c.title = (text || "Image").slice(0, 40);
  $("input").value = ""; pending = []; showPending(); save(); render(); reply();
};
async function reply() {
  const c = chat(), bubble = addBubble("assistant");
  const messages = (c.system ? [{ role: "system", content: c.system }] : []).concat(
    c.messages.map((m) => ({ role: m.role, content: m.content, ...(m.tool_calls ? { tool_calls: m.tool_calls } : {}) })));
  const sampling = Object.fromEntries(FIELDS.filter((f) => settings[f] !== undefined).map((f) => [f, settings[f]]));
  controller = new AbortController();
  $("send").hidden = true; $("stop").hidden = false; status("…");
  const m = { role: "assistant", content: "", reasoning_content: "" }, t0 = performance.now();
  let calls = [], tokens = 0, frame = 0, sent = false, answered = false;
  const paint = () => { frame = 0; m.tool_calls = calls.length ? calls : undefined; fill(bubble, m, !m.content && !calls.length);
                        $("log").scrollTop = $("log").scrollHeight; };
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ messages, stream: true, stream_options: { include_usage: true }, ...sampling }) });
    sent = true;
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw Object.assign(new Error(err.error?.message || res.statusText), { status: res.status });
    }
    const reader = res.body.getReader(), decoder = new TextDecoder(); let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim(); buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") { answered = true; continue; }
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        if (event.usage) tokens = event.usage.completion_tokens;
        const delta = event.choices?.[0]?.delta || {};
        if (delta.content) m.content += delta.content;
        if (delta.reasoning_content) m.reasoning_content += delta.reasoning_content;
        for (const call of delta.tool_calls || []) {  // the name first, then the arguments in pieces
          calls[call.index] ??= { id: call.id, type: "function", function: { name: call.function?.name || "", arguments: "" } };
          calls[call.index].function.arguments += call.function?.arguments || "";
        }
        if (delta.content || delta.reasoning_content || delta.tool_calls) frame = frame || requestAnimationFrame(paint);
      }
    }
    if (!answered) throw new TypeError("the stream ended early");
    const seconds = (performance.now() - t0) / 1000;
    m.stats = tokens ? `${tokens} tokens, ${(tokens / seconds).toFixed(1)} tokens/s` : "";
    status(m.stats);
  } catch (err) {
    if (err.name === "AbortError") { m.note = "(stopped)"; status("stopped"); }
    else if (err.status === 401) status("wrong or missing API key: set it in ⚙ and send again", true);
    else if (err instanceof TypeError) { m.note = "(server unreachable: the reply so far is kept)"; status("server unreachable", true); }
    else { m.note = `Error: ${err.message}`; status("", false); bubble.classList.add("error"); }
    if (err.status === 401 || (!m.content && !m.reasoning_content && !sent)) {  // nothing answered: the message goes back to the box
      const last = c.messages.pop(); if (last && !$("input").value) $("input").value = textOf(last.content);
      bubble.remove(); save(); render(); if (err.status !== 401) status("server unreachable", true);
    }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    if (m.content || m.reasoning_content || calls.length || (m.note && c.messages.at(-1)?.role === "user" && bubble.isConnected)) {
      if (!m.reasoning_content) delete m.reasoning_content;
      m.tool_calls = calls.length ? calls : undefined;
      c.messages.push(m); save(); render();
    }
    controller = null; $("send").hidden = false; $("stop").hidden = true;
  }
}
if (narrow()) document.body.classList.remove("open");
applyTheme(); loadSettings(); modelName();
if (!chats.length) newChat(); else render();
