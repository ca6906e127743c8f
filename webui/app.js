// tsjax chat: a single-page client for the Web UI protocol (see README "HTTP API").
//
// State lives in `state`; the DOM is rebuilt from it when the conversation's shape changes
// (send, edit, delete, new chat) and patched in place while a reply streams, so a long answer
// does not rebuild the whole transcript on every token.

import { apiFetch, showImage } from "./auth.js";
import { escapeHtml, renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const els = {
  transcript: $("transcript"), empty: $("empty"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"), fileInput: $("file-input"), chips: $("attachments"),
  newChat: $("new-chat"), modelBadge: $("model-badge"), queueBadge: $("queue-badge"),
  settings: $("settings"), settingsToggle: $("settings-toggle"), system: $("system-prompt"),
  think: $("think"), temperature: $("temperature"), topP: $("top-p"), topK: $("top-k"),
  maxTokens: $("max-tokens"), tools: $("tools"), toolsStatus: $("tools-status"),
  toolsExample: $("tools-example"), toolChoice: $("tool-choice"),
};

const state = {
  sessionId: null,
  messages: [],     // {role, text, attachments?, thinking?, toolCalls?, stats?, error?, note?}
  pending: [],      // attachments waiting for the next message
  controller: null, // AbortController of the reply in flight
  model: null,      // GET /api/models
};

// Default prompts for a message with attachments but no text (as the reference UI does).
const DEFAULT_PROMPTS = {
  image: "What is in this image?",
  text: "Please analyze the attached text file and summarize its content.",
  audio: "Listen to this audio and describe what you hear.",
  video: "What is happening in this video?",
};

// -- small helpers --------------------------------------------------------------------------

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

const basename = (path) => String(path).split(/[\\/]/).pop();

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// Follow the stream only while the reader is at the bottom, so scrolling up to read is not
// yanked back down by every token.
function nearBottom() {
  const t = els.transcript;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 48;
}
function scrollToBottom() {
  els.transcript.scrollTop = els.transcript.scrollHeight;
}

// -- settings ------------------------------------------------------------------------------

const SETTINGS_KEY = "tsjax.webui.settings";
const SETTING_FIELDS = [
  "system", "think", "temperature", "topP", "topK", "maxTokens", "tools", "toolChoice",
];

function loadSettings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}"); } catch { /* ignore */ }
  for (const f of SETTING_FIELDS) {
    if (!(f in saved)) continue;
    if (els[f].type === "checkbox") els[f].checked = !!saved[f];
    else els[f].value = saved[f];
  }
}

function saveSettings() {
  const out = {};
  for (const f of SETTING_FIELDS) out[f] = els[f].type === "checkbox" ? els[f].checked : els[f].value;
  try { localStorage.setItem(SETTINGS_KEY, JSON.stringify(out)); } catch { /* private mode */ }
}

// The tools textarea must hold a JSON array of function definitions (OpenAI/Ollama shape,
// or the flat {name, parameters}); returns {tools} or {error}. Blank means no tools.
function parseTools() {
  const raw = els.tools.value.trim();
  if (!raw) return { tools: null };
  let value;
  try { value = JSON.parse(raw); } catch (e) { return { error: `Invalid JSON: ${e.message}` }; }
  if (!Array.isArray(value)) value = [value];
  for (const [i, t] of value.entries()) {
    const fn = t && typeof t === "object" ? (t.function ?? t) : null;
    if (!fn || typeof fn.name !== "string" || !fn.name) {
      return { error: `Tool ${i + 1} needs a function name ({"type": "function", "function": {"name": …}}).` };
    }
    if (fn.parameters !== undefined && (typeof fn.parameters !== "object" || Array.isArray(fn.parameters))) {
      return { error: `Tool ${i + 1} (${fn.name}): parameters must be a JSON schema object.` };
    }
  }
  return { tools: value };
}

function validateTools() {
  const { tools, error } = parseTools();
  els.tools.setAttribute("aria-invalid", error ? "true" : "false");
  els.toolsStatus.classList.toggle("error", !!error);
  els.toolsStatus.textContent = error ??
    (tools ? `${tools.length} tool${tools.length > 1 ? "s" : ""}: ${tools.map((t) => (t.function ?? t).name).join(", ")}` : "No tools.");
  return { tools, error };
}

const EXAMPLE_TOOLS = [{
  type: "function",
  function: {
    name: "get_weather",
    description: "Get the current weather for a city",
    parameters: {
      type: "object",
      properties: { city: { type: "string", description: "City name" } },
      required: ["city"],
    },
  },
}];

// Sampling fields: blank inputs are left out so the server's defaults apply.
function samplingOptions() {
  const out = {};
  const num = (input, parse) => {
    const v = input.value.trim();
    if (v === "") return undefined;
    const n = parse(v);
    return Number.isFinite(n) ? n : undefined;
  };
  const t = num(els.temperature, parseFloat); if (t !== undefined) out.temperature = t;
  const p = num(els.topP, parseFloat); if (p !== undefined) out.topP = p;
  const k = num(els.topK, (v) => parseInt(v, 10)); if (k !== undefined) out.topK = k;
  const m = num(els.maxTokens, (v) => parseInt(v, 10)); if (m !== undefined && m > 0) out.maxTokens = m;
  return out;
}

// -- server calls --------------------------------------------------------------------------

async function createSession() {
  const res = await apiFetch("/api/sessions", { method: "POST" });
  if (!res.ok) throw new Error(`could not create a session (HTTP ${res.status})`);
  state.sessionId = (await res.json()).sessionId;
  els.transcript.dataset.sessionId = state.sessionId; // lets tests and devtools see it
}

function disposeSession(id, keepalive = false) {
  if (!id) return Promise.resolve();
  return apiFetch(`/api/sessions/${encodeURIComponent(id)}`, { method: "DELETE", keepalive })
    .catch(() => {}); // best effort: the server expires idle sessions anyway
}

async function loadModel() {
  try {
    const res = await apiFetch("/api/models");
    const m = await res.json();
    state.model = m;
    if (m.status === "loading") {
      els.modelBadge.textContent = "Loading model…";
      setTimeout(loadModel, 2000);
      return;
    }
    if (!m.loaded) {
      els.modelBadge.textContent = m.error ? `Model error: ${m.error}` : "No model loaded";
      els.modelBadge.classList.add("bad");
      return;
    }
    els.modelBadge.classList.remove("bad");
    els.modelBadge.textContent = `${m.loaded} (${m.architecture}) · ${m.loadedBackend}`;
    els.modelBadge.title = `context ${m.contextLength} tokens`;
    // Blank = the server's default: answer until the context window is full.
    els.maxTokens.placeholder = "auto";
    els.maxTokens.title = `blank: up to ${m.defaultMaxTokens} tokens (the context window)`;
  } catch {
    els.modelBadge.textContent = "Server unreachable";
    els.modelBadge.classList.add("bad");
    setTimeout(loadModel, 5000);
  }
}

async function pollQueue() {
  if (document.visibilityState === "visible") {
    try {
      const q = await (await apiFetch("/api/queue/status")).json();
      const badge = els.queueBadge;
      if (q.pending_requests > 0) {
        badge.textContent = `Queue: ${q.pending_requests} waiting`;
        badge.className = "badge queue waiting";
        badge.hidden = false;
      } else if (q.busy) {
        badge.textContent = "Queue: processing";
        badge.className = "badge queue busy";
        badge.hidden = false;
      } else {
        badge.hidden = true;
      }
    } catch { /* the model badge reports an unreachable server */ }
  }
  setTimeout(pollQueue, 2000);
}

// -- attachments ---------------------------------------------------------------------------

let nextAttachmentId = 1;

async function uploadFile(file) {
  const kind = file.type.split("/")[0]; // the server's answer decides; this is for the chip
  const att = {
    id: nextAttachmentId++, fileName: file.name, size: file.size, status: "uploading",
    mediaType: kind === "image" || kind === "video" ? kind : "text",
  };
  state.pending.push(att);
  renderPendingChips();
  updateSendState();
  try {
    const form = new FormData();
    form.append("file", file, file.name);
    // The server takes uploads only with this header (or an API key): a page on another
    // site cannot send it without a CORS preflight, so it cannot write files here.
    const res = await apiFetch("/api/upload", {
      method: "POST", body: form, headers: { "X-TSJAX-UI": "1" },
    });
    const data = await res.json().catch(() => ({}));
    if (!res.ok || !data.ok) throw new Error(data.error || `HTTP ${res.status}`);
    Object.assign(att, data, { status: "ready" });
    if (att.mediaType === "unknown") {
      att.status = "error";
      att.error = "unsupported file type";
    }
  } catch (e) {
    att.status = "error";
    att.error = e.message;
  }
  renderPendingChips();
  updateSendState();
}

function attachmentNote(att) {
  if (att.status === "uploading") return "uploading…";
  if (att.status === "error") return `failed: ${att.error}`;
  if (att.truncated) return `truncated to ${att.truncateLimit} ${att.truncateUnit}`;
  return formatBytes(att.size);
}

function thumbnail(url) {
  const img = el("img", { alt: "", class: "thumb" });
  showImage(img, url); // with an API key, fetched with it (an <img src> sends no headers)
  return img;
}

function chip(att, onRemove) {
  const kind = att.mediaType;
  const thumb = kind === "image" && att.path
    ? thumbnail(`/uploads/${basename(att.path)}`)
    : el("span", { class: "icon", "aria-hidden": "true", text: { text: "TXT", image: "IMG", audio: "AUD", video: "VID" }[kind] ?? "FILE" });
  const li = el("li", { class: `chip ${att.status ?? "ready"} kind-${kind}`, title: att.fileName },
    thumb,
    el("span", { class: "name", text: att.fileName }),
    el("span", { class: "size", text: attachmentNote(att) }));
  if (onRemove) {
    li.append(el("button", {
      type: "button", class: "remove", "aria-label": `Remove ${att.fileName}`, text: "×",
      onclick: onRemove,
    }));
  }
  return li;
}

function renderPendingChips() {
  els.chips.replaceChildren(...state.pending.map((att) => chip(att, () => {
    state.pending = state.pending.filter((a) => a !== att);
    renderPendingChips();
    updateSendState();
    els.prompt.focus();
  })));
}

// -- building the request ------------------------------------------------------------------

// A user message as the server sees it: text files inlined at the front (the reference UI's
// format; their paths are listed so the server does not inline them twice), images by path.
function wireUser(m) {
  const atts = (m.attachments ?? []).filter((a) => a.status === "ready");
  const texts = atts.filter((a) => a.mediaType === "text")
    .map((a) => `[File: ${a.fileName}]\n${a.textContent ?? ""}\n[End of file]`);
  const content = [...texts, m.text].filter(Boolean).join("\n\n");
  const out = { role: "user", content };
  const paths = (kind) => atts.filter((a) => a.mediaType === kind).map((a) => a.path);
  if (texts.length) out.textFilePaths = paths("text");
  const video = atts.filter((a) => a.mediaType === "video");
  const images = [...paths("image"), ...video.flatMap((a) => a.framePaths ?? [])];
  if (images.length) out.imagePaths = images;
  if (video.length) out.isVideo = true;
  if (paths("audio").length) out.audioPaths = paths("audio");
  return out;
}

function wireMessages(history) {
  const out = [];
  const system = els.system.value.trim();
  if (system) out.push({ role: "system", content: system });
  for (const m of history) {
    if (m.role === "user") out.push(wireUser(m));
    else if (m.role === "tool") out.push({ role: "tool", content: m.text });
    else if (m.role === "assistant") {
      // Failed or empty replies (stopped before any text) are left out, as the reference does.
      if (m.error || (!m.text && !m.toolCalls?.length)) continue;
      const msg = { role: "assistant", content: m.text };
      if (m.toolCalls?.length) {
        msg.tool_calls = m.toolCalls.map((c) => ({
          id: c.id, type: "function", function: { name: c.name, arguments: c.arguments },
        }));
      }
      out.push(msg);
    }
  }
  return out;
}

// -- rendering -----------------------------------------------------------------------------

function statsLine(d) {
  let line = `${d.tokenCount} tokens · ${Number(d.elapsed).toFixed(1)}s · ${Number(d.tokPerSec).toFixed(1)} tok/s`;
  if (d.promptTokens > 0) {
    line += ` · KV ${d.kvReusedTokens}/${d.promptTokens} (${Math.round(d.kvReusePercent)}%)`;
  }
  if (d.finishReason === "length") line += " · max tokens reached";
  return line;
}

function footerText(m) {
  if (m.stopped) return "Stopped by user";
  if (m.error) return "Inference failed";
  if (m.stats) return statsLine(m.stats);
  return "";
}

function toolCallView(call) {
  let args = call.arguments;
  try { args = JSON.stringify(typeof args === "string" ? JSON.parse(args) : args, null, 2); } catch { /* raw */ }
  return el("div", { class: "tool-call" },
    el("div", { class: "tool-name" }, document.createTextNode("Tool call: "),
      el("code", { text: call.name })),
    el("pre", {}, el("code", { text: args ?? "{}" })));
}

// Fill an assistant bubble's parts from its message (called per animation frame while streaming).
function paintAssistant(m) {
  const v = m.view;
  if (!v) return;
  v.reasoning.hidden = !m.thinking;
  if (m.thinking) v.reasoningBody.textContent = m.thinking;
  v.content.innerHTML = m.error
    ? `<p class="error">Error: ${escapeHtml(m.error)}</p>`
    : renderMarkdown(m.text);
  v.tools.replaceChildren(...(m.toolCalls ?? []).map(toolCallView));
  v.status.hidden = !m.status;
  v.status.textContent = m.status ?? "";
  v.footer.textContent = footerText(m);
  v.footer.title = m.stats ? `time to first token ${m.stats.ttft}s · finish: ${m.stats.finishReason}` : "";
  v.note.hidden = !m.note;
  v.note.textContent = m.note ?? "";
}

function actionButton(label, title, onclick) {
  return el("button", { type: "button", class: "ghost small", title, text: label, onclick });
}

function renderMessage(m, index) {
  const busy = !!state.controller;
  const last = index === state.messages.length - 1;
  const who = { user: "You", assistant: "Assistant", tool: "Tool result" }[m.role];
  const article = el("article", { class: `msg ${m.role}`, "data-index": index, "aria-label": who });
  article.append(el("div", { class: "who", text: who }));

  if (m.role === "assistant") {
    const reasoningBody = el("div", { class: "reasoning-body" });
    const reasoning = el("details", { class: "reasoning", open: m.streaming || m.reasoningOpen },
      el("summary", { text: "Reasoning" }), reasoningBody);
    // Remember the reader's choice across re-renders. Listening to clicks, not `toggle`, keeps
    // the open-while-streaming default from counting as a choice; the block folds when done.
    reasoning.firstChild.addEventListener("click", () => { m.reasoningOpen = !reasoning.open; });
    const content = el("div", { class: "content markdown" });
    const tools = el("div", { class: "tool-calls" });
    const status = el("div", { class: "status", role: "status" });
    const note = el("p", { class: "note" });
    const footer = el("footer", { class: "stats" });
    article.append(reasoning, status, content, tools, note, footer);
    m.view = { article, reasoning, reasoningBody, content, tools, status, note, footer };
    if (m.streaming) article.setAttribute("aria-busy", "true");
    paintAssistant(m);
    if (last && !busy && m.toolCalls?.length) article.append(toolResultForm(m));
  } else {
    // Pictures the model was shown appear as pictures; other files as chips.
    const shown = (m.attachments ?? []).filter((a) => a.mediaType === "image" && a.path);
    const others = (m.attachments ?? []).filter((a) => !shown.includes(a));
    if (shown.length) {
      article.append(el("div", { class: "pictures", "aria-label": "Images" },
        ...shown.map((a) => el("a", { href: `/uploads/${basename(a.path)}`, target: "_blank", rel: "noopener", title: a.fileName },
          el("img", { src: `/uploads/${basename(a.path)}`, alt: a.fileName, class: "picture", loading: "lazy" })))));
    }
    if (others.length) {
      article.append(el("ul", { class: "chips", "aria-label": "Attachments" },
        ...others.map((a) => chip(a))));
    }
    article.append(el("div", { class: "content plain", text: m.text }));
  }

  if (!busy && !m.editing) {
    const actions = el("div", { class: "actions" });
    if (m.role === "user") actions.append(actionButton("Edit", "Edit this message and regenerate the reply", () => startEdit(index)));
    if (m.role === "assistant") actions.append(actionButton("Regenerate", "Generate this reply again", () => regenerate(index)));
    actions.append(actionButton("Delete", "Delete this message and everything after it", () => truncate(index)));
    article.append(actions);
  }
  if (m.editing) article.replaceChildren(article.firstChild, editForm(m, index));
  return article;
}

function renderAll() {
  const keep = nearBottom();
  const nodes = state.messages.map(renderMessage);
  els.empty.hidden = state.messages.length > 0;
  els.transcript.replaceChildren(els.empty, ...nodes);
  if (keep) scrollToBottom();
}

function editForm(m, index) {
  const id = `edit-${index}`;
  const area = el("textarea", { id, rows: 3, class: "edit-text" });
  area.value = m.text;
  const save = () => {
    m.text = area.value.trim();
    m.editing = false;
    if (!m.text && !m.attachments?.length) return;
    state.messages.splice(index + 1); // everything after the edit is stale
    renderAll();
    generate();
  };
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); save(); }
    if (e.key === "Escape") { m.editing = false; renderAll(); }
  });
  queueMicrotask(() => area.focus());
  return el("div", { class: "edit" },
    el("label", { for: id, class: "visually-hidden", text: "Edit message" }), area,
    el("div", { class: "actions" },
      el("button", { type: "button", class: "primary small", text: "Save & regenerate", onclick: save }),
      el("button", { type: "button", class: "ghost small", text: "Cancel",
        onclick: () => { m.editing = false; renderAll(); } })));
}

// After a tool call the user plays the tool: the result goes back as a `tool` message.
function toolResultForm(m) {
  const id = "tool-result";
  const names = m.toolCalls.map((c) => c.name).join(", ");
  const area = el("textarea", { id, rows: 2, placeholder: '{"temperature": 21, "unit": "C"}' });
  const send = () => {
    if (!area.value.trim()) { area.focus(); return; }
    state.messages.push({ role: "tool", text: area.value.trim() });
    renderAll();
    generate();
  };
  return el("div", { class: "tool-result" },
    el("label", { for: id, text: `Result of ${names}` }), area,
    el("button", { type: "button", class: "primary small", text: "Send tool result", onclick: send }));
}

// -- conversation actions ------------------------------------------------------------------

function startEdit(index) {
  state.messages.forEach((m, i) => { m.editing = i === index; });
  renderAll();
}

function truncate(index) {
  state.messages.splice(index);
  renderAll();
  els.prompt.focus();
}

function regenerate(index) {
  state.messages.splice(index);
  renderAll();
  generate();
}

function setBusy(busy) {
  els.send.hidden = busy;
  els.stop.hidden = !busy;
  updateSendState();
}

function updateSendState() {
  const uploading = state.pending.some((a) => a.status === "uploading");
  els.send.disabled = uploading || !state.sessionId;
  els.send.title = uploading ? "Waiting for uploads to finish" : "";
}

function sendFromComposer() {
  if (state.controller || els.send.disabled) return;
  const { error } = validateTools();
  if (error) {
    openSettings(true);
    els.tools.focus();
    return;
  }
  const attachments = state.pending.filter((a) => a.status === "ready");
  let text = els.prompt.value.trim();
  if (!text && !attachments.length) return;
  if (!text) text = DEFAULT_PROMPTS[attachments[0].mediaType] ?? "Describe the attached file.";
  state.messages.push({ role: "user", text, attachments });
  state.pending = [];
  renderPendingChips();
  els.prompt.value = "";
  autoGrow();
  renderAll();
  scrollToBottom();
  generate();
}

// Streams one assistant reply for the current history.
async function generate() {
  const history = [...state.messages];
  const m = { role: "assistant", text: "", thinking: "", toolCalls: [], streaming: true, status: "Waiting…" };
  state.messages.push(m);
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  renderAll();
  scrollToBottom();

  let frame = 0; // coalesce repaints to one per animation frame
  const repaint = () => {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      const keep = nearBottom();
      paintAssistant(m);
      if (keep) scrollToBottom();
    });
  };

  const body = {
    messages: wireMessages(history),
    sessionId: state.sessionId,
    think: els.think.checked,
    ...samplingOptions(),
  };
  const { tools } = parseTools();
  if (tools) {
    body.tools = tools;
    // "required" is enforced by the server with a grammar, so the answer is always a call.
    if (els.toolChoice.value !== "auto") body.tool_choice = els.toolChoice.value;
  }

  try {
    let res = await postChat(body, controller.signal);
    if (res.status === 404) {
      // The server forgot our session (restart, expiry): start a new one and retry once.
      await createSession();
      body.sessionId = state.sessionId;
      res = await postChat(body, controller.signal);
    }
    if (!res.ok) {
      const data = await res.json().catch(() => ({}));
      throw new Error(data.error?.message ?? data.error ?? `HTTP ${res.status}`);
    }
    await readEvents(res, (f) => {
      if (f.queue_position !== undefined) {
        const ahead = f.queue_position;
        m.status = ahead <= 1 ? "Next in queue…" : `Position ${ahead} in queue (${ahead} requests ahead)…`;
      } else if (f.done) {
        m.stats = f;
        if (f.error) m.error = f.error;
        if (f.aborted) m.stopped = true;
        if (f.sessionId) state.sessionId = f.sessionId;
        if (f.mediaIgnored) {
          m.note = `This model reads text only: ${f.mediaIgnored} attachment(s) were not shown to it.`;
        }
      } else {
        m.status = null;
        if (f.thinking) m.thinking += f.thinking;
        if (f.token) m.text += f.token;
        if (f.tool_calls) m.toolCalls.push(...f.tool_calls);
      }
      repaint();
    });
    if (!m.stats && !controller.signal.aborted) throw new Error("the connection closed before the reply finished");
  } catch (e) {
    if (e.name === "AbortError" || controller.signal.aborted) m.stopped = true;
    else m.error = e.message;
  } finally {
    if (frame) cancelAnimationFrame(frame);
    m.streaming = false;
    m.status = null;
    if (state.controller === controller) state.controller = null;
    setBusy(false);
    // The page may have moved on (New chat) while this reply streamed.
    if (state.messages.includes(m)) renderAll();
  }
}

function postChat(body, signal) {
  return apiFetch("/api/chat", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify(body),
    signal,
  });
}

// SSE over fetch: blocks are separated by a blank line; only `data:` lines carry frames.
async function readEvents(res, onFrame) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trimStart();
        if (data && data !== "[DONE]") onFrame(JSON.parse(data));
      }
    }
  }
}

function stop() {
  state.controller?.abort(); // closing the stream makes the server abort the request
}

async function newChat() {
  stop();
  const old = state.sessionId;
  state.sessionId = null;
  state.messages = [];
  state.pending = [];
  renderPendingChips();
  renderAll();
  updateSendState();
  await disposeSession(old);
  try {
    await createSession();
  } catch (e) {
    els.modelBadge.textContent = e.message;
  }
  updateSendState();
  els.prompt.focus();
}

// -- composer and layout -------------------------------------------------------------------

function autoGrow() {
  els.prompt.style.height = "auto";
  els.prompt.style.height = `${Math.min(els.prompt.scrollHeight, 200)}px`;
}

const narrow = window.matchMedia("(max-width: 760px)");

function openSettings(open) {
  document.body.classList.toggle("settings-closed", !open);
  els.settingsToggle.setAttribute("aria-expanded", String(open));
}

function wire() {
  els.composer.addEventListener("submit", (e) => { e.preventDefault(); sendFromComposer(); });
  els.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendFromComposer();
    }
  });
  els.prompt.addEventListener("input", autoGrow);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.controller) stop();
  });
  els.stop.addEventListener("click", () => { stop(); els.prompt.focus(); });
  els.newChat.addEventListener("click", newChat);
  els.fileInput.addEventListener("change", () => {
    for (const f of els.fileInput.files) uploadFile(f);
    els.fileInput.value = ""; // picking the same file again should upload it again
  });
  // Drop files anywhere on the composer; paste images from the clipboard.
  els.composer.addEventListener("dragover", (e) => { e.preventDefault(); els.composer.classList.add("drop"); });
  els.composer.addEventListener("dragleave", () => els.composer.classList.remove("drop"));
  els.composer.addEventListener("drop", (e) => {
    e.preventDefault();
    els.composer.classList.remove("drop");
    for (const f of e.dataTransfer.files) uploadFile(f);
  });
  els.prompt.addEventListener("paste", (e) => {
    for (const f of e.clipboardData?.files ?? []) uploadFile(f);
  });
  els.transcript.addEventListener("click", (e) => {
    const btn = e.target.closest("[data-copy]");
    if (!btn) return;
    navigator.clipboard?.writeText(btn.parentElement.querySelector("pre").textContent)
      .then(() => { btn.textContent = "Copied"; setTimeout(() => { btn.textContent = "Copy"; }, 1500); })
      .catch(() => { btn.textContent = "Copy failed"; });
  });
  els.settingsToggle.addEventListener("click", () => {
    openSettings(document.body.classList.contains("settings-closed"));
  });
  for (const f of SETTING_FIELDS) els[f].addEventListener("change", saveSettings);
  els.tools.addEventListener("input", () => { validateTools(); saveSettings(); });
  els.toolsExample.addEventListener("click", () => {
    els.tools.value = JSON.stringify(EXAMPLE_TOOLS, null, 2);
    validateTools();
    saveSettings();
  });
  // The server would keep an abandoned tab's session (and its cache row) until it expires.
  window.addEventListener("pagehide", () => disposeSession(state.sessionId, true));
}

async function main() {
  // The phone drawer opens just below the header, whose height changes as its badges wrap.
  const topbar = document.querySelector(".topbar");
  new ResizeObserver(() => {
    document.documentElement.style.setProperty("--header-h", `${topbar.offsetHeight}px`);
  }).observe(topbar);
  loadSettings();
  validateTools();
  openSettings(!narrow.matches); // the settings panel is a drawer on phones
  wire();
  updateSendState();
  loadModel();
  pollQueue();
  try {
    await createSession();
  } catch (e) {
    els.modelBadge.textContent = e.message;
    els.modelBadge.classList.add("bad");
  }
  updateSendState();
  els.prompt.focus();
}

main();
