// API keys for servers started with `--api-key` (README "Access control"). The page itself is
// public; every API call goes through `apiFetch`, which sends the key kept in this browser
// (localStorage) as `Authorization: Bearer <key>`. A 401 forgets the key, asks for one in a
// small dialog (index.html `#key-dialog`) and retries; without a key server nothing is asked.

const STORAGE_KEY = "tsjax.apiKey";
let asking = null; // the dialog's answer while it is open: concurrent 401s share one prompt
let memoryKey = ""; // where localStorage is unavailable (private mode)

export function storedKey() {
  try { return localStorage.getItem(STORAGE_KEY) || ""; } catch { return ""; }
}

function keep(key) {
  try {
    if (key) localStorage.setItem(STORAGE_KEY, key);
    else localStorage.removeItem(STORAGE_KEY);
  } catch { /* private mode: the key lives until the page closes */ }
  memoryKey = key;
}

const currentKey = () => storedKey() || memoryKey;

// Resolves with the key typed in, or "" when the dialog is dismissed.
function askForKey(refused) {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-message").textContent = refused
    ? "The server refused that API key. Enter another one."
    : "This server needs an API key.";
  input.value = "";
  asking = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      asking = null;
      resolve(dialog.returnValue === "ok" ? input.value.trim() : "");
    }, { once: true });
  });
  dialog.showModal();
  input.focus();
  return asking;
}

// fetch() with the stored key; on 401, ask for a key and try again (until the user cancels,
// when the 401 response is returned to the caller).
export async function apiFetch(url, options = {}) {
  for (;;) {
    const key = currentKey();
    const headers = new Headers(options.headers || {});
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const res = await fetch(url, { ...options, headers });
    if (res.status !== 401) return res;
    const refused = Boolean(key);
    keep("");
    const entered = await askForKey(refused);
    if (!entered) return res;
    keep(entered);
  }
}

// An <img> of a protected file: <img src> cannot send headers, so with a key the image is
// fetched with it and shown from a blob URL.
export function showImage(img, url) {
  if (!currentKey()) {
    img.src = url;
    return;
  }
  apiFetch(url)
    .then((res) => (res.ok ? res.blob() : null))
    .then((blob) => { if (blob) img.src = URL.createObjectURL(blob); })
    .catch(() => {});
}
