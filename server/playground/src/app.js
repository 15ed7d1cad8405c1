// The playground: conversations in the sidebar, the open one in the middle, a composer at the bottom. It talks to
// the server only through the public /v1 API (api.js), so it doubles as an example client.
import { HttpError, listModels, streamChat } from "./api.js";
import { copyText, renderMarkdown } from "./render.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $("sidebar"), conversations: $("conversations"), messages: $("messages"), input: $("input"),
  send: $("send"), stop: $("stop"), model: $("model-name"), settings: $("settings"),
  keyDialog: $("key-dialog"), keyInput: $("key-input"),
};
const fields = {
  system: $("system-prompt"), temperature: $("temperature"), top_p: $("top-p"), max_tokens: $("max-tokens"),
  seed: $("seed"),
};

let conversations = store.loadConversations();
let current = conversations[0] ?? null;
let settings = store.loadSettings();
let apiKey = store.loadApiKey();
let model = "";
let running = null; // the AbortController of the reply being generated

// -- conversations -----------------------------------------------------------------------------------------------

function persist() {
  store.saveConversations(conversations);
}

function openConversation(conversation) {
  current = conversation;
  renderSidebar();
  renderMessages();
  ui.sidebar.classList.remove("open");
}

function startConversation() {
  if (running) return;
  const conversation = store.newConversation();
  conversations.unshift(conversation);
  persist();
  openConversation(conversation);
  ui.input.focus();
}

function renderSidebar() {
  ui.conversations.replaceChildren(...conversations.map((conversation) => {
    const item = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = conversation.title;
    open.className = conversation === current ? "current" : "";
    open.setAttribute("aria-current", conversation === current ? "true" : "false");
    open.addEventListener("click", () => !running && openConversation(conversation));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Delete ${conversation.title}`);
    remove.addEventListener("click", () => {
      if (running) return;
      conversations = conversations.filter((c) => c !== conversation);
      persist();
      if (conversation === current) current = conversations[0] ?? null;
      renderSidebar();
      renderMessages();
    });
    item.append(open, remove);
    return item;
  }));
}

// -- messages ----------------------------------------------------------------------------------------------------

function button(label, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  element.addEventListener("click", onClick);
  return element;
}

function renderMessage(message, index) {
  const article = document.createElement("article");
  article.className = `message ${message.role}`;
  if (message.reasoning) {
    const details = document.createElement("details");
    details.className = "reasoning";
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const body = document.createElement("div");
    body.textContent = message.reasoning;
    details.append(summary, body);
    article.append(details);
  }
  const body = document.createElement("div");
  body.className = "body";
  if (message.role === "assistant") renderMarkdown(body, message.content || "");
  else body.textContent = message.content;
  article.append(body);
  for (const call of message.tool_calls || []) {
    const pre = document.createElement("pre");
    pre.className = "tool-call";
    pre.textContent = `${call.name}(${call.arguments})`;
    article.append(pre);
  }
  if (message.error) {
    const error = document.createElement("p");
    error.className = "error";
    error.setAttribute("role", "alert");
    error.textContent = message.error;
    article.append(error);
  }
  const foot = document.createElement("footer");
  if (message.role === "assistant" && (message.usage || message.stopped)) {
    const stats = document.createElement("span");
    stats.className = "stats";
    const parts = [];
    if (message.usage) {
      parts.push(`${message.usage.prompt_tokens} prompt + ${message.usage.completion_tokens} reply tokens`);
      if (message.tokensPerSecond) parts.push(`${message.tokensPerSecond.toFixed(1)} tok/s`);
    }
    if (message.stopped) parts.push("stopped");
    stats.textContent = parts.join(", ");
    foot.append(stats);
  }
  if (!running) {
    if (message.role === "user") foot.append(button("Edit", () => editMessage(index, article)));
    else foot.append(button("Copy", (event) => copyText(message.content || "", event.target)));
    if (message.role === "assistant" && index === current.messages.length - 1) {
      foot.append(button("Regenerate", regenerate));
    }
  }
  article.append(foot);
  return article;
}

function renderMessages() {
  const messages = current ? current.messages : [];
  ui.messages.replaceChildren(...messages.map(renderMessage));
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function updateLast() {
  const last = current.messages.length - 1;
  const fresh = renderMessage(current.messages[last], last);
  ui.messages.lastElementChild.replaceWith(fresh);
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function editMessage(index, article) {
  const area = document.createElement("textarea");
  area.value = current.messages[index].content;
  area.setAttribute("aria-label", "Edit message");
  const save = button("Save & send", () => {
    current.messages = current.messages.slice(0, index);
    current.messages.push({ role: "user", content: area.value });
    persist();
    reply();
  });
  const cancel = button("Cancel", renderMessages);
  article.replaceChildren(area, save, cancel);
  area.focus();
}

// -- generation --------------------------------------------------------------------------------------------------

function requestBody() {
  const messages = current.messages.map(({ role, content }) => ({ role, content }));
  if (settings.system.trim()) messages.unshift({ role: "system", content: settings.system });
  const body = { model, messages, temperature: Number(settings.temperature), top_p: Number(settings.top_p),
    max_tokens: Number(settings.max_tokens) };
  if (settings.seed !== "" && settings.seed !== null) body.seed = Number(settings.seed);
  return body;
}

function setRunning(controller) {
  running = controller;
  ui.send.hidden = Boolean(controller);
  ui.stop.hidden = !controller;
  if (!controller) ui.input.focus();
}

async function reply() {
  if (!current || running) return;
  const message = { role: "assistant", content: "", reasoning: "", tool_calls: [] };
  const body = requestBody();
  current.messages.push(message);
  const controller = new AbortController();
  setRunning(controller);
  renderMessages();
  let firstToken = 0;
  let pending = false;
  const draw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; updateLast(); });
  };
  try {
    await streamChat(body, apiKey, controller.signal, (chunk) => {
      if (chunk.usage) message.usage = chunk.usage;
      for (const choice of chunk.choices) {
        const delta = choice.delta;
        if (!firstToken && (delta.content || delta.reasoning_content)) firstToken = performance.now();
        message.content += delta.content || "";
        message.reasoning += delta.reasoning_content || "";
        for (const call of delta.tool_calls || []) {
          message.tool_calls[call.index] ??= { name: "", arguments: "" };
          message.tool_calls[call.index].name += call.function.name || "";
          message.tool_calls[call.index].arguments += call.function.arguments || "";
        }
        if (choice.finish_reason) message.finish_reason = choice.finish_reason;
      }
      draw();
    });
  } catch (error) {
    if (error.name === "AbortError") message.stopped = true;
    else message.error = error.message;
    if (error instanceof HttpError && error.status === 401) askForKey();
  }
  if (message.usage && firstToken) {
    const seconds = (performance.now() - firstToken) / 1000;
    if (seconds > 0 && message.usage.completion_tokens > 1) {
      message.tokensPerSecond = (message.usage.completion_tokens - 1) / seconds;
    }
  }
  if (current.title === "New chat" && current.messages[0]) current.title = current.messages[0].content.slice(0, 40);
  setRunning(null);
  persist();
  renderSidebar();
  renderMessages();
}

function send() {
  const text = ui.input.value.trim();
  if (!text || running) return;
  if (!current) startConversation();
  current.messages.push({ role: "user", content: text });
  ui.input.value = "";
  persist();
  reply();
}

function regenerate() {
  if (running || current.messages.at(-1)?.role !== "assistant") return;
  current.messages.pop();
  reply();
}

// -- settings and the API key ------------------------------------------------------------------------------------

function showSettings() {
  for (const [name, field] of Object.entries(fields)) field.value = settings[name];
  $("api-key").value = apiKey;
}

function readSettings() {
  for (const [name, field] of Object.entries(fields)) settings[name] = field.value;
  store.saveSettings(settings);
  apiKey = $("api-key").value.trim();
  store.saveApiKey(apiKey);
}

function askForKey() {
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.keyInput.focus();
}

async function connect() {
  try {
    const models = await listModels(apiKey);
    model = models[0] || "";
    ui.model.textContent = model;
  } catch (error) {
    ui.model.textContent = error.message;
    if (error instanceof HttpError && error.status === 401) askForKey();
  }
}

// -- wiring ------------------------------------------------------------------------------------------------------

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
ui.stop.addEventListener("click", () => running?.abort());
$("new-chat").addEventListener("click", startConversation);
$("export").addEventListener("click", () => store.exportJson(conversations));
$("toggle-sidebar").addEventListener("click", () => ui.sidebar.classList.toggle("open"));
$("toggle-settings").addEventListener("click", (event) => {
  ui.settings.hidden = !ui.settings.hidden;
  event.target.setAttribute("aria-expanded", String(!ui.settings.hidden));
});
ui.settings.addEventListener("input", readSettings);
ui.settings.addEventListener("submit", (event) => event.preventDefault());
$("key-form").addEventListener("submit", () => {
  apiKey = ui.keyInput.value.trim();
  store.saveApiKey(apiKey);
  showSettings();
  connect();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && running) running.abort();
});

showSettings();
renderSidebar();
renderMessages();
connect();
