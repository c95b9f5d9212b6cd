// Promptline chat page: streams replies from POST /v1/chat/stream with fetch + a stream reader
// (EventSource cannot POST), shows every failure as what it is, resumes a reply after a dropped
// connection (GET /v1/chat/stream/{id} with Last-Event-ID, docs/resume.md), and Stop cancels the
// stream (POST .../cancel) down to the model. No third-party code, no external requests.
"use strict";

const KEY_STORAGE = "promptline.apiKey";
const MODEL_STORAGE = "promptline.model";
const RATE_LIMIT_CODES = new Set(["QPM_EXCEEDED", "TPM_EXCEEDED", "UPSTREAM_RATE_LIMITED"]);
const TIMEOUT_CODES = new Set(["STREAM_TIMEOUT", "FIRST_TOKEN_TIMEOUT"]);
// Waits before each reconnect after a drop; then the page gives up and says so.
const RECONNECT_DELAYS_MS = [500, 1000, 2000, 4000];

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

const chat = { messages: [], conversationId: "", stream: null };

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
  showReconnecting(turn, false);
  turn.item.dataset.state = "error";
  turn.item.dataset.code = error.code || "";
  markCutOff(turn);
  addNotice(turn, describeError(error), error.request_id || requestId, "error");
}

function showStopped(turn, requestId) {
  showReconnecting(turn, false);
  turn.item.dataset.state = "stopped";
  markCutOff(turn);
  addNotice(turn, "stopped — the model was cancelled", requestId, "stopped");
}

/** The "reconnecting…" line of a turn whose connection dropped, shown or removed. */
function showReconnecting(turn, on) {
  const shown = turn.item.querySelector(".notice.reconnecting");
  if (on && !shown) {
    turn.item.dataset.state = "reconnecting";
    addNotice(turn, "reconnecting…", "", "reconnecting");
  } else if (!on && shown) {
    shown.remove();
    if (turn.item.dataset.state === "reconnecting") turn.item.dataset.state = "streaming";
  }
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

/** Thumbs up / down under a finished reply: POST /v1/feedback, the latest click wins. */
function showFeedback(turn, requestId) {
  if (!requestId) return;
  const bar = document.createElement("span");
  bar.className = "feedback";
  const status = document.createElement("span");
  status.className = "feedback-status";
  status.setAttribute("role", "status");
  const buttons = [[1, "\u{1F44D}", "good reply"], [-1, "\u{1F44E}", "bad reply"]].map(
    ([score, label, title]) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "thumb";
      button.dataset.score = String(score);
      button.textContent = label;
      button.title = title;
      button.setAttribute("aria-label", title);
      button.setAttribute("aria-pressed", "false");
      button.addEventListener("click", () => sendFeedback(requestId, score, buttons, status));
      return button;
    });
  bar.append(...buttons, status);
  turn.item.append(bar);
}

async function sendFeedback(requestId, score, buttons, status) {
  try {
    const response = await fetch("/v1/feedback", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify({ request_id: requestId, score }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      status.textContent = (body.error && body.error.message) || `feedback failed (${response.status})`;
      return;
    }
    for (const b of buttons) b.setAttribute("aria-pressed", String(Number(b.dataset.score) === score));
    status.textContent = "thanks";
  } catch (err) {
    status.textContent = "feedback not sent: network error";
  }
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

/** A wait that a Stop (the stream's abort signal) cuts short with an AbortError. */
function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("stopped", "AbortError"));
    }, { once: true });
  });
}

/**
 * Play one response of the stream into its turn: the POST's or a resume's. Returns "finished"
 * (done, an error, or an HTTP error shown) or "dropped" (the connection failed, or the body
 * ended without a terminal event: resume). A Stop's AbortError is thrown.
 */
async function play(stream, response, resumed) {
  const { turn } = stream;
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    const error = (body && body.error) || { message: `HTTP ${response.status}` };
    if (resumed && response.status === 404) {
      stream.failure = { ...error, message: "connection lost — the reply can no longer be resumed" };
      return "gone";
    }
    if (resumed && error.retryable) {
      stream.failure = error;  // the journal may be back on the next attempt
      return "dropped";
    }
    showError(turn, error, stream.id);
    return "finished";
  }
  showReconnecting(turn, false);
  try {
    for await (const { event, data, id } of sseEvents(response.body)) {
      if (event === "start") {
        stream.id = data.request_id || stream.id;
        turn.item.dataset.requestId = stream.id;
      } else if (event === "delta") {
        const n = Number(id);
        if (n > 0 && n <= stream.lastId) continue;  // already on screen: never twice
        if (n > 0) stream.lastId = n;
        stream.reply += data.text;
        turn.body.textContent = stream.reply;  // text, never HTML: model output is not trusted
        stream.progress = true;
      } else if (event === "done") {
        turn.item.dataset.state = "done";
        showUsage(turn, data);
        showFeedback(turn, stream.id);
        return "finished";
      } else if (event === "error") {
        const error = data.error || {};
        // This page's Stop; any other cancel (the connection dropped with no grace, a grace
        // that ran out, a shutdown, a Stop elsewhere) is shown with the server's reason.
        if (error.code === "CANCELLED" && stream.stopped) showStopped(turn, stream.id);
        else showError(turn, error, stream.id);
        return "finished";
      }
    }
  } catch (err) {
    if (err.name === "AbortError") throw err;
    stream.failure = { message: `connection lost (${err.message})` };
    return "dropped";
  }
  stream.failure = { message: "the connection closed before the reply finished" };
  return "dropped";
}

async function send(text) {
  const conversation = chat.conversationId;  // "New chat" meanwhile: this reply is not its
  chat.messages.push({ role: "user", content: text });
  addTurn("user", text);
  const turn = addTurn("assistant", "");
  // Our own request id: the stream can be resumed (or stopped) even before its `start` arrived.
  const stream = { id: newId(), lastId: 0, reply: "", turn, controller: new AbortController(),
                   progress: false, failure: null, stopped: false };
  const { signal } = stream.controller;
  chat.stream = stream;
  turn.item.dataset.requestId = stream.id;
  setBusy(true);
  try {
    let outcome = "dropped";
    try {
      const response = await fetch("/v1/chat/stream", {
        method: "POST",
        headers: { ...authHeaders(), "Content-Type": "application/json",
                   "X-Request-Id": stream.id },
        body: JSON.stringify({
          model: ui.model.value,
          messages: chat.messages,
          conversation_id: chat.conversationId,
        }),
        signal,
      });
      outcome = await play(stream, response, false);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      stream.failure = { message: `connection lost (${err.message})` };
    }
    for (let attempt = 0; outcome === "dropped"; attempt++) {
      if (attempt >= RECONNECT_DELAYS_MS.length) break;
      showReconnecting(turn, true);
      await sleep(RECONNECT_DELAYS_MS[attempt], signal);
      stream.progress = false;
      try {
        const response = await fetch(`/v1/chat/stream/${encodeURIComponent(stream.id)}`, {
          headers: { ...authHeaders(), "Last-Event-ID": String(stream.lastId) },
          signal,
        });
        outcome = await play(stream, response, true);
      } catch (err) {
        if (err.name === "AbortError") throw err;
        stream.failure = { message: `connection lost (${err.message})` };
      }
      if (stream.progress) attempt = -1;  // text came through: a later drop starts afresh
    }
    if (outcome !== "finished") showError(turn, stream.failure || {}, stream.id);
  } catch (err) {
    if (err.name === "AbortError") showStopped(turn, stream.id);
    else showError(turn, { message: `something went wrong (${err.message})` }, stream.id);
  } finally {
    turn.item.classList.remove("streaming");
    chat.stream = null;
    if (chat.conversationId !== conversation) {
      // A new chat began while this stream ended: its transcript starts empty.
    } else if (stream.reply) {
      chat.messages.push({ role: "assistant", content: stream.reply });
    } else {
      // Nothing came back: keep the transcript honest and let the user resend the same text.
      chat.messages.pop();
      if (!ui.prompt.value) ui.prompt.value = text;
    }
    setBusy(false);
  }
}

/** Stop: cancel the stream on the server (a dropped connection alone would leave it its resume
 * grace), and abort the local fetch. */
function stop() {
  const stream = chat.stream;
  if (!stream) return;
  fetch(`/v1/chat/stream/${encodeURIComponent(stream.id)}/cancel`, {
    method: "POST", headers: authHeaders(), keepalive: true,
  }).catch(() => {});  // best effort: the abort below still ends the reply here
  stream.stopped = true;
  stream.controller.abort();
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

/** A fresh id that follows the request-id rule (letters, digits, `. _ : -`). */
function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();  // secure contexts only
  return Array.from(crypto.getRandomValues(new Uint8Array(16)),
                    (b) => b.toString(16).padStart(2, "0")).join("");
}

function newChat() {
  stop();
  chat.messages = [];
  chat.conversationId = newId();
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
ui.stop.addEventListener("click", stop);
ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || chat.stream) return;
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
