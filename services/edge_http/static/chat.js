// Promptline chat page: streams replies from POST /v1/chat/stream with fetch + a stream reader
// (EventSource cannot POST), shows every failure as what it is, and Stop aborts the fetch, which
// makes the edge cancel the chain down to the model. No third-party code, no external requests.
"use strict";

const KEY_STORAGE = "promptline.apiKey";
const MODEL_STORAGE = "promptline.model";
const RATE_LIMIT_CODES = new Set(["QPM_EXCEEDED", "TPM_EXCEEDED", "UPSTREAM_RATE_LIMITED"]);
const TIMEOUT_CODES = new Set(["STREAM_TIMEOUT", "FIRST_TOKEN_TIMEOUT"]);

const el = (id) => document.getElementById(id);
const ui = {
  key: el("api-key"),
  model: el("model"),
  newChat: el("new-chat"),
  status: el("status"),
  transcript: el("transcript"),
  composer: el("composer"),
  prompt: el("prompt"),
  send: el("send"),
  stop: el("stop"),
  conversation: el("conversation-id"),
};

const chat = { messages: [], conversationId: "", controller: null };

// --- errors -------------------------------------------------------------------------------------

/** The one sentence a person should read for an error object from the server. */
function describeError(error) {
  const code = error.code || "";
  if (RATE_LIMIT_CODES.has(code)) {
    const ms = Number(error.retry_after_ms || 0);
    return ms > 0 ? `rate limited — try again in ${Math.ceil(ms / 1000)} s`
                  : "rate limited — try again later";
  }
  if (code === "BUDGET_EXCEEDED") {
    const ms = Number(error.retry_after_ms || 0);
    if (!error.retryable) return error.message || "this request costs more than the budget allows";
    return ms > 0 ? `spending budget used up — it resets in ${untilText(ms)}`
                  : "spending budget used up";
  }
  if (TIMEOUT_CODES.has(code)) return "the model stopped responding";
  if (code === "MODERATION_BLOCKED") {
    return error.stage === "mid_stream" ? "this reply was blocked by moderation"
                                        : "this message was blocked by moderation";
  }
  return error.message || code || "something went wrong";
}

/** A wait as a person says it: "40 s", "12 min", "5 h", "3 days". */
function untilText(ms) {
  const s = Math.ceil(ms / 1000);
  if (s < 120) return `${s} s`;
  if (s < 2 * 3600) return `${Math.ceil(s / 60)} min`;
  if (s < 2 * 86400) return `${Math.ceil(s / 3600)} h`;
  return `${Math.ceil(s / 86400)} days`;
}

// --- transcript ---------------------------------------------------------------------------------

function addTurn(role, text) {
  const item = document.createElement("li");
  item.className = role === "user" ? "message user" : "message assistant streaming";
  item.dataset.state = role === "user" ? "sent" : "streaming";
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  item.append(label, body);
  ui.transcript.append(item);
  item.scrollIntoView({ block: "end" });
  return { item, label, body };
}

function markCutOff(turn) {
  if (!turn.body.textContent || turn.label.querySelector(".cutoff")) return;
  const badge = document.createElement("span");
  badge.className = "cutoff";
  badge.textContent = "cut off";
  badge.title = "The reply ended before the model finished; the text above is partial.";
  turn.label.append(badge);
}

function addNotice(turn, text, requestId, kind) {
  const notice = document.createElement("div");
  notice.className = `notice ${kind}`;
  notice.setAttribute("role", kind === "error" ? "alert" : "status");
  const message = document.createElement("span");
  message.className = "notice-text";
  message.textContent = text;
  notice.append(message);
  if (requestId) {
    const rid = document.createElement("span");
    rid.className = "request-id";
    rid.append("request id ");
    const code = document.createElement("code");
    code.textContent = requestId;
    rid.append(code);
    notice.append(rid);
  }
  turn.item.append(notice);
  turn.item.scrollIntoView({ block: "end" });
}

function showError(turn, error, requestId) {
  turn.item.dataset.state = "error";
  turn.item.dataset.code = error.code || "";
  markCutOff(turn);
  addNotice(turn, describeError(error), error.request_id || requestId, "error");
}

function showStopped(turn, requestId) {
  turn.item.dataset.state = "stopped";
  markCutOff(turn);
  addNotice(turn, "stopped — the model was cancelled", requestId, "stopped");
}

function showUsage(turn, done) {
  const usage = document.createElement("span");
  usage.className = "usage";
  const u = done.usage || {};
  usage.textContent = `${done.model || ""} · ${u.prompt_tokens ?? 0} prompt + ` +
    `${u.completion_tokens ?? 0} completion tokens` +
    (u.cost_usd && u.cost_usd !== "0" ? ` · $${u.cost_usd}` : "") +
    (done.finish_reason === "length" ? " · stopped at max_tokens" : "");
  turn.item.append(usage);
}

// --- SSE over fetch -----------------------------------------------------------------------------

/** Parse a `text/event-stream` body into {event, data, id}; comments (heartbeats) are skipped. */
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const event = parseBlock(block);
        if (event) yield event;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function parseBlock(block) {
  let event = "message", id = null;
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "id") id = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  return { event, id, data: JSON.parse(data.join("\n")) };
}

// --- sending ------------------------------------------------------------------------------------

function authHeaders() {
  return { Authorization: `Bearer ${ui.key.value.trim()}` };
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  ui.model.disabled = busy || ui.model.options.length === 0 || !ui.model.value;
}

async function send(text) {
  chat.messages.push({ role: "user", content: text });
  addTurn("user", text);
  const turn = addTurn("assistant", "");
  const controller = new AbortController();
  chat.controller = controller;
  setBusy(true);
  let reply = "";
  let requestId = "";
  let finished = false;
  try {
    const response = await fetch("/v1/chat/stream", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify({
        model: ui.model.value,
        messages: chat.messages,
        conversation_id: chat.conversationId,
      }),
      signal: controller.signal,
    });
    requestId = response.headers.get("X-Request-Id") || "";
    turn.item.dataset.requestId = requestId;
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      showError(turn, (body && body.error) || { message: `HTTP ${response.status}` }, requestId);
      finished = true;
      return;
    }
    for await (const { event, data } of sseEvents(response.body)) {
      if (event === "start") {
        requestId = data.request_id || requestId;
        turn.item.dataset.requestId = requestId;
      } else if (event === "delta") {
        reply += data.text;
        turn.body.textContent = reply;  // text, never HTML: model output is not trusted
      } else if (event === "done") {
        turn.item.dataset.state = "done";
        showUsage(turn, data);
        finished = true;
      } else if (event === "error") {
        showError(turn, data.error || {}, requestId);
        finished = true;
      }
    }
    if (!finished) {
      showError(turn, { message: "the connection closed before the reply finished" }, requestId);
      finished = true;
    }
  } catch (err) {
    if (err.name === "AbortError") showStopped(turn, requestId);
    else showError(turn, { message: `connection lost (${err.message})` }, requestId);
  } finally {
    turn.item.classList.remove("streaming");
    chat.controller = null;
    if (reply) {
      chat.messages.push({ role: "assistant", content: reply });
    } else {
      // Nothing came back: keep the transcript honest and let the user resend the same text.
      chat.messages.pop();
      if (!ui.prompt.value) ui.prompt.value = text;
    }
    setBusy(false);
  }
}

// --- models, key, conversation ------------------------------------------------------------------

let modelsRequest = 0;

async function loadModels() {
  const ticket = ++modelsRequest;
  const key = ui.key.value.trim();
  ui.model.replaceChildren();
  ui.model.disabled = true;
  if (!key) {
    ui.model.append(new Option("enter an API key", ""));
    setStatus("Enter your API key to start.");
    return;
  }
  setStatus("Loading models…");
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    const body = await response.json().catch(() => null);
    if (ticket !== modelsRequest) return;  // a newer key was typed meanwhile
    if (!response.ok) {
      ui.model.append(new Option("no models", ""));
      setStatus(`Models unavailable: ${describeError((body && body.error) || {})}`, true);
      return;
    }
    const wanted = localStorage.getItem(MODEL_STORAGE);
    for (const model of body.data) ui.model.append(new Option(model.id, model.id));
    if (wanted && body.data.some((m) => m.id === wanted)) ui.model.value = wanted;
    ui.model.disabled = body.data.length === 0;
    setStatus(body.data.length ? "" : "This key may not use any model.", !body.data.length);
  } catch (err) {
    if (ticket === modelsRequest) setStatus(`Cannot reach the server (${err.message})`, true);
  }
}

function setStatus(text, problem = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("problem", problem);
}

function newConversationId() {
  if (crypto.randomUUID) return crypto.randomUUID();  // secure contexts only
  return Array.from(crypto.getRandomValues(new Uint8Array(16)),
                    (b) => b.toString(16).padStart(2, "0")).join("");
}

function newChat() {
  if (chat.controller) chat.controller.abort();
  chat.messages = [];
  chat.conversationId = newConversationId();
  ui.conversation.textContent = chat.conversationId;
  ui.transcript.replaceChildren();
  ui.prompt.focus();
}

// --- wiring -------------------------------------------------------------------------------------

let keyTimer = 0;
ui.key.value = localStorage.getItem(KEY_STORAGE) || "";
ui.key.addEventListener("input", () => {
  localStorage.setItem(KEY_STORAGE, ui.key.value.trim());
  clearTimeout(keyTimer);
  keyTimer = setTimeout(loadModels, 250);
});
ui.model.addEventListener("change", () => localStorage.setItem(MODEL_STORAGE, ui.model.value));
ui.newChat.addEventListener("click", newChat);
ui.stop.addEventListener("click", () => chat.controller && chat.controller.abort());
ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || chat.controller) return;
  if (!ui.model.value) {
    setStatus("Pick a model first (enter an API key to load them).", true);
    return;
  }
  ui.prompt.value = "";
  send(text);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

newChat();
loadModels();
