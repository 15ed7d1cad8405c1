// Conversations and settings kept in the browser (localStorage), and exported as JSON.

const CONVERSATIONS = "qwen-serve.conversations";
const SETTINGS = "qwen-serve.settings";
const API_KEY = "qwen-serve.api-key";

export const DEFAULT_SETTINGS = { system: "", temperature: 0.7, top_p: 0.9, max_tokens: 512, seed: "" };

function read(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

export function loadConversations() {
  return read(CONVERSATIONS, []);
}

export function saveConversations(conversations) {
  localStorage.setItem(CONVERSATIONS, JSON.stringify(conversations));
}

export function loadSettings() {
  return { ...DEFAULT_SETTINGS, ...read(SETTINGS, {}) };
}

export function saveSettings(settings) {
  localStorage.setItem(SETTINGS, JSON.stringify(settings));
}

export function loadApiKey() {
  return localStorage.getItem(API_KEY) || "";
}

export function saveApiKey(key) {
  if (key) localStorage.setItem(API_KEY, key);
  else localStorage.removeItem(API_KEY);
}

export function newConversation() {
  return { id: crypto.randomUUID(), title: "New chat", created: Date.now(), messages: [] };
}

export function exportJson(conversations) {
  const blob = new Blob([JSON.stringify(conversations, null, 2)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `qwen-serve-conversations-${new Date().toISOString().slice(0, 10)}.json`;
  link.click();
  URL.revokeObjectURL(link.href);
}
