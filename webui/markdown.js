// A small, safe Markdown renderer for model output.
//
// Safety comes from order: the whole input is HTML-escaped first, so nothing the model writes
// can become markup; only the constructs below add tags, and link targets are limited to
// http(s)/mailto so `javascript:` URLs never reach an href. Supported: fenced code blocks
// (an unterminated fence renders as code, which is what a half-streamed block needs),
// inline code, headings, bold, italics, strikethrough, links, bullet/numbered lists,
// blockquotes, horizontal rules and paragraphs.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// Placeholders use private-use characters, which escaping leaves alone and models never emit.
const hold = (store, html) => `\uE000${store.push(html) - 1}\uE001`;
// Repeated because a held piece can contain another (inline code inside a link label).
function restore(text, store) {
  for (let i = 0; i < 4 && /\uE000\d+\uE001/.test(text); i++) {
    text = text.replace(/\uE000(\d+)\uE001/g, (_, n) => store[+n]);
  }
  return text;
}

function inline(text, store) {
  // Code spans first so their contents are not treated as emphasis or links.
  text = text.replace(/`([^`\n]+)`/g, (_, code) => hold(store, `<code>${code}</code>`));
  text = text.replace(/\[([^\]\n]+)\]\(([^)\s]+)\)/g, (whole, label, url) => {
    // `url` is already escaped (& became &amp;, quotes became entities): safe inside "…".
    if (!/^(https?:\/\/|mailto:)/i.test(url)) return whole;
    return hold(store, `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`);
  });
  return text
    .replace(/\*\*(?=\S)([^*\n]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/__(?=\S)([^_\n]*?\S)__/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*(?=\S)([^*\n]*?\S)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/(^|[^_\w])_(?=\S)([^_\n]*?\S)_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)([^~\n]*?\S)~~/g, "<del>$1</del>");
}

function codeBlock(lang, body) {
  const cls = lang ? ` class="language-${lang}"` : "";
  const label = lang ? `<span class="code-lang">${lang}</span>` : "";
  return `<div class="code">${label}<button type="button" class="copy" data-copy>Copy</button>` +
    `<pre><code${cls}>${body}</code></pre></div>`;
}

export function renderMarkdown(source) {
  const store = [];
  let text = escapeHtml(source.replace(/\r\n?/g, "\n"));

  // Fenced blocks (closed ones, then a trailing open one while it is still streaming).
  text = text.replace(/^```([\w+#.-]*)[^\n]*\n([\s\S]*?)^```[ \t]*$/gm,
    (_, lang, body) => hold(store, codeBlock(lang, body.replace(/\n$/, ""))));
  text = text.replace(/^```([\w+#.-]*)[^\n]*\n?([\s\S]*)$/m,
    (_, lang, body) => hold(store, codeBlock(lang, body)));

  const out = [];
  let para = [];
  let list = null; // { tag: "ul" | "ol", items: [] }
  const flushPara = () => {
    if (para.length) out.push(`<p>${inline(para.join("\n"), store).replace(/\n/g, "<br>")}</p>`);
    para = [];
  };
  const flushList = () => {
    if (list) {
      const items = list.items.map((i) => `<li>${inline(i, store)}</li>`).join("");
      out.push(`<${list.tag}${list.start > 1 ? ` start="${list.start}"` : ""}>${items}</${list.tag}>`);
    }
    list = null;
  };

  for (const line of text.split("\n")) {
    let m;
    if (/^\uE000\d+\uE001$/.test(line.trim())) { // a code block on its own line
      flushPara(); flushList(); out.push(line.trim());
    } else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
      flushPara(); flushList();
      const level = m[1].length;
      out.push(`<h${level}>${inline(m[2].replace(/\s+#+\s*$/, ""), store)}</h${level}>`);
    } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flushPara(); flushList(); out.push("<hr>");
    } else if ((m = line.match(/^\s*([-*+])\s+(.*)$/)) || (m = line.match(/^\s*(\d{1,9})[.)]\s+(.*)$/))) {
      flushPara();
      const tag = /\d/.test(m[1]) ? "ol" : "ul";
      if (!list || list.tag !== tag) {
        flushList();
        list = { tag, items: [], start: tag === "ol" ? parseInt(m[1], 10) : 1 };
      }
      list.items.push(m[2]);
    } else if ((m = line.match(/^&gt;\s?(.*)$/))) {
      flushPara(); flushList();
      out.push(`<blockquote>${inline(m[1], store)}</blockquote>`);
    } else if (!line.trim()) {
      flushPara(); flushList();
    } else if (list && /^\s{2,}\S/.test(line)) {
      list.items[list.items.length - 1] += ` ${line.trim()}`; // a wrapped list item
    } else {
      flushList(); para.push(line);
    }
  }
  flushPara(); flushList();
  // Adjacent quote lines read as one quote.
  return restore(out.join("\n").replace(/<\/blockquote>\n<blockquote>/g, "<br>"), store);
}
