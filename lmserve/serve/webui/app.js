// lmserve chat page: talks to this server's OpenAI API (/v1/models, /v1/chat/completions, streaming).
//
// Model text only ever reaches the page as text nodes (see markdown.js); nothing here
// assigns innerHTML.
"use strict";

const API_BASE = new URL("../", window.location.href); // the page lives at /chat/
const STORAGE = { conversations: "lmserve.conversations", current: "lmserve.current",
  settings: "lmserve.settings", apiKey: "lmserve.apiKey" };

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $("sidebar"), scrim: $("scrim"), toggleSidebar: $("toggle-sidebar"),
  newChat: $("new-chat"), conversationList: $("conversation-list"),
  model: $("model"), systemPrompt: $("system-prompt"), temperature: $("temperature"),
  topP: $("top-p"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
  title: $("chat-title"), serverStatus: $("server-status"), messages: $("messages"),
  composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
};

const state = {
  conversations: loadJson(STORAGE.conversations, []),
  currentId: localStorage.getItem(STORAGE.current),
  settings: loadJson(STORAGE.settings, {}),
  abortController: null,
};

// ---- storage --------------------------------------------------------------

function loadJson(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value === null ? fallback : value;
  } catch {
    return fallback;
  }
}

function saveConversations() {
  try {
    localStorage.setItem(STORAGE.conversations, JSON.stringify(state.conversations));
    if (state.currentId) localStorage.setItem(STORAGE.current, state.currentId);
    else localStorage.removeItem(STORAGE.current);
  } catch (error) {
    showStatus("Could not save chats in this browser: " + error.message, "error");
  }
}

function saveSettings() {
  state.settings = {
    model: ui.model.value || state.settings.model || "",
    systemPrompt: ui.systemPrompt.value,
    temperature: ui.temperature.value,
    topP: ui.topP.value,
    maxTokens: ui.maxTokens.value,
  };
  localStorage.setItem(STORAGE.settings, JSON.stringify(state.settings));
}

function apiKey() {
  return localStorage.getItem(STORAGE.apiKey) || "";
}

// ---- conversations --------------------------------------------------------

function currentConversation() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

function createConversation() {
  const conversation = { id: "c" + Date.now().toString(36) + Math.random().toString(36).slice(2, 6),
    title: "New chat", messages: [], updated: Date.now() };
  state.conversations.unshift(conversation);
  state.currentId = conversation.id;
  return conversation;
}

function startNewChat() {
  if (state.abortController) return;
  state.currentId = null;
  saveConversations();
  renderAll();
  closeSidebar();
  ui.prompt.focus();
}

function switchConversation(id) {
  if (state.abortController) return;
  state.currentId = id;
  saveConversations();
  renderAll();
  closeSidebar();
}

function deleteConversation(id) {
  if (state.abortController && id === state.currentId) return;
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = null;
  saveConversations();
  renderAll();
}

// ---- rendering ------------------------------------------------------------

function renderAll() {
  renderConversationList();
  renderMessages();
}

function renderConversationList() {
  ui.conversationList.replaceChildren(...state.conversations.map(conversationItem));
}

function conversationItem(conversation) {
  const item = document.createElement("li");
  item.className = "conversation" + (conversation.id === state.currentId ? " active" : "");
  item.dataset.id = conversation.id;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "conversation-open";
  open.textContent = conversation.title;
  open.title = conversation.title;
  open.addEventListener("click", () => switchConversation(conversation.id));
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "conversation-delete";
  remove.setAttribute("aria-label", "Delete chat: " + conversation.title);
  remove.textContent = "\u00d7";
  remove.addEventListener("click", () => deleteConversation(conversation.id));
  item.append(open, remove);
  return item;
}

function renderMessages() {
  const conversation = currentConversation();
  ui.title.textContent = conversation ? conversation.title : "New chat";
  if (!conversation || conversation.messages.length === 0) {
    ui.messages.replaceChildren($("empty-state").content.cloneNode(true));
    return;
  }
  ui.messages.replaceChildren(...conversation.messages.map(messageElement));
  scrollToBottom(true);
}

function messageElement(message) {
  const wrapper = document.createElement("article");
  wrapper.className = "message " + message.role;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  wrapper.append(bubble);
  const footer = document.createElement("div");
  footer.className = "meta";
  wrapper.append(footer);
  fillMessage(wrapper, message);
  return wrapper;
}

function fillMessage(wrapper, message) {
  const bubble = wrapper.querySelector(".bubble");
  if (message.role === "assistant") bubble.replaceChildren(Markdown.render(message.content));
  else bubble.textContent = message.content;
  wrapper.querySelector(".meta").textContent = metaText(message);
}

function metaText(message) {
  const parts = [];
  if (message.stats) {
    const { tokens, seconds, exact } = message.stats;
    parts.push((exact ? "" : "\u2248") + tokens + " tokens");
    if (seconds > 0) parts.push((tokens / seconds).toFixed(1) + " tokens/s");
  }
  if (message.stopped) parts.push("stopped");
  return parts.join(" \u00b7 ");
}

function appendError(text) {
  const conversation = currentConversation();
  if (conversation) conversation.messages.push({ role: "error", content: text });
  if (ui.messages.querySelector(".empty")) ui.messages.replaceChildren();
  ui.messages.append(messageElement({ role: "error", content: text }));
  scrollToBottom(true);
}

function scrollToBottom(force) {
  const distance = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight;
  if (force || distance < 120) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function showStatus(text, kind) {
  ui.serverStatus.textContent = text;
  ui.serverStatus.className = "server-status " + (kind || "");
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.newChat.disabled = busy;
  document.body.classList.toggle("busy", busy);
}

// ---- API ------------------------------------------------------------------

function headers() {
  const result = { "Content-Type": "application/json" };
  if (apiKey()) result.Authorization = "Bearer " + apiKey();
  return result;
}

async function errorMessage(response) {
  let detail = response.statusText || "request failed";
  try {
    const body = await response.json();
    detail = (body.error && body.error.message) || body.detail || body.message || detail;
  } catch {
    // not JSON: keep the status text
  }
  if (typeof detail !== "string") detail = JSON.stringify(detail);
  const hint = response.status === 401 ? " Set the API key in Settings." : "";
  return `Server error ${response.status}: ${detail.replace(/\.$/, "")}.${hint}`;
}

function unreachableMessage() {
  return `Cannot reach the server at ${API_BASE.origin}. Is lmserve running?`;
}

let modelsRequestNumber = 0;

async function loadModels() {
  const requestNumber = ++modelsRequestNumber; // only the newest answer (newest API key) counts
  showStatus("Connecting\u2026");
  let response;
  try {
    response = await fetch(new URL("v1/models", API_BASE), { headers: headers() });
  } catch {
    if (requestNumber === modelsRequestNumber) showStatus("Server unreachable", "error");
    return;
  }
  if (requestNumber !== modelsRequestNumber) return;
  if (!response.ok) {
    showStatus(response.status === 401 ? "API key needed (Settings)" : "Server error " + response.status, "error");
    return;
  }
  const body = await response.json();
  const ids = (body.data || []).map((model) => model.id);
  ui.model.replaceChildren(...ids.map((id) => new Option(id, id)));
  if (ids.includes(state.settings.model)) ui.model.value = state.settings.model;
  showStatus(ids.length ? "Connected" : "No models served", ids.length ? "ok" : "error");
}

function numberOrUndefined(text, parse) {
  if (String(text).trim() === "") return undefined;
  const value = parse(text);
  return Number.isFinite(value) ? value : undefined;
}

function requestBody(conversation) {
  const messages = [];
  const system = ui.systemPrompt.value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const message of conversation.messages) {
    if ((message.role === "user" || message.role === "assistant") && message.content) {
      messages.push({ role: message.role, content: message.content });
    }
  }
  return {
    model: ui.model.value || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberOrUndefined(ui.temperature.value, parseFloat),
    top_p: numberOrUndefined(ui.topP.value, parseFloat),
    max_tokens: numberOrUndefined(ui.maxTokens.value, (text) => parseInt(text, 10)),
  };
}

// Reads an SSE body and calls onEvent(json) for each `data:` line; true when [DONE] came.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return true;
        if (data) onEvent(JSON.parse(data));
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ---- sending --------------------------------------------------------------

async function send(text) {
  if (state.abortController || !text.trim()) return;
  const conversation = currentConversation() || createConversation();
  if (conversation.messages.length === 0) conversation.title = text.trim().split("\n")[0].slice(0, 60);
  conversation.messages.push({ role: "user", content: text });
  conversation.updated = Date.now();
  saveSettings();
  saveConversations();
  renderAll();

  const reply = { role: "assistant", content: "" };
  const body = requestBody(conversation);
  conversation.messages.push(reply);
  const replyElement = messageElement(reply);
  replyElement.classList.add("streaming");
  ui.messages.append(replyElement);
  scrollToBottom(true);
  await stream(body, reply, replyElement);
  replyElement.classList.remove("streaming");
  if (!reply.content && !reply.stopped) {
    conversation.messages.splice(conversation.messages.indexOf(reply), 1);
    replyElement.remove();
  }
  conversation.updated = Date.now();
  saveConversations();
}

async function stream(body, reply, replyElement) {
  const controller = new AbortController();
  state.abortController = controller;
  setBusy(true);
  const started = performance.now();
  let chunks = 0;
  let usage = null;
  let redraw = 0;
  const draw = () => { redraw = 0; fillMessage(replyElement, reply); scrollToBottom(false); };
  try {
    const response = await fetch(new URL("v1/chat/completions", API_BASE), {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) { appendError(await errorMessage(response)); return; }
    const finished = await readEvents(response, (event) => {
      if (event.error) throw new Error("Server error: " + (event.error.message || JSON.stringify(event.error)));
      if (event.usage) usage = event.usage;
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        reply.content += delta.content;
        chunks++;
        // Coalesce redraws to one per frame: re-rendering Markdown per token is wasted work.
        if (!redraw) redraw = requestAnimationFrame(draw);
      }
    });
    if (!finished) appendError("The server closed the stream before the reply was complete.");
  } catch (error) {
    if (error.name === "AbortError") reply.stopped = true;
    else if (error instanceof TypeError) appendError(unreachableMessage());
    else appendError(error.message);
  } finally {
    if (redraw) cancelAnimationFrame(redraw);
    const seconds = (performance.now() - started) / 1000;
    if (usage || chunks) {
      reply.stats = { tokens: usage ? usage.completion_tokens : chunks, seconds, exact: Boolean(usage) };
    }
    fillMessage(replyElement, reply);
    scrollToBottom(false);
    state.abortController = null;
    setBusy(false);
  }
}

function stop() {
  if (state.abortController) state.abortController.abort();
}

// ---- sidebar on small screens ----------------------------------------------

function openSidebar() {
  document.body.classList.add("sidebar-open");
  ui.scrim.hidden = false;
  ui.toggleSidebar.setAttribute("aria-expanded", "true");
}

function closeSidebar() {
  document.body.classList.remove("sidebar-open");
  ui.scrim.hidden = true;
  ui.toggleSidebar.setAttribute("aria-expanded", "false");
}

// ---- wiring ---------------------------------------------------------------

function restoreSettings() {
  ui.systemPrompt.value = state.settings.systemPrompt || "";
  ui.temperature.value = state.settings.temperature || "";
  ui.topP.value = state.settings.topP || "";
  ui.maxTokens.value = state.settings.maxTokens || "";
  ui.apiKey.value = apiKey();
}

function autoGrow() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = Math.min(ui.prompt.scrollHeight, 200) + "px";
}

function submitPrompt() {
  const text = ui.prompt.value;
  if (!text.trim() || state.abortController) return;
  ui.prompt.value = "";
  autoGrow();
  send(text);
}

function wire() {
  ui.composer.addEventListener("submit", (event) => { event.preventDefault(); submitPrompt(); });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitPrompt();
    }
  });
  ui.prompt.addEventListener("input", autoGrow);
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", startNewChat);
  ui.toggleSidebar.addEventListener("click", () =>
    document.body.classList.contains("sidebar-open") ? closeSidebar() : openSidebar());
  ui.scrim.addEventListener("click", closeSidebar);
  for (const input of [ui.model, ui.systemPrompt, ui.temperature, ui.topP, ui.maxTokens]) {
    input.addEventListener("change", saveSettings);
  }
  ui.apiKey.addEventListener("change", () => {
    localStorage.setItem(STORAGE.apiKey, ui.apiKey.value.trim());
    loadModels();
  });
}

if (!currentConversation()) state.currentId = null;
restoreSettings();
wire();
renderAll();
loadModels();
