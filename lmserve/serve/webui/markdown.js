// Markdown -> DOM nodes for model replies.
//
// Written here rather than vendored because it never parses HTML: every piece of
// model text reaches the page through document.createTextNode / textContent, so a
// `<script>` or `<img onerror>` in a reply is shown as text and cannot run. A
// general-purpose library (marked, markdown-it) emits an HTML string that would need
// a sanitizer on top. Covers what chat models write: fenced code, inline code,
// headings, lists (nested by indentation), block quotes, rules, tables, emphasis,
// links (http, https, mailto only).
"use strict";

const Markdown = (() => {
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const LIST_ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_SEPARATOR = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
  const SAFE_URL = /^(https?:\/\/|mailto:)/i;

  function el(tag, className, children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    for (const child of children || []) node.append(child);
    return node;
  }

  // ---- blocks -------------------------------------------------------------

  function render(text) {
    const fragment = document.createDocumentFragment();
    renderBlocks(String(text).replace(/\r\n?/g, "\n").split("\n"), fragment);
    return fragment;
  }

  function renderBlocks(lines, parent) {
    let i = 0;
    while (i < lines.length) {
      if (lines[i].trim() === "") { i++; continue; }
      i = renderBlock(lines, i, parent);
    }
  }

  // Renders the block starting at line i; returns the index of the next line.
  function renderBlock(lines, i, parent) {
    const line = lines[i];
    let match;
    if ((match = FENCE.exec(line))) return renderFence(lines, i, match, parent);
    if ((match = HEADING.exec(line))) {
      parent.append(el("h" + match[1].length, null, inline(match[2])));
      return i + 1;
    }
    if (RULE.test(line)) { parent.append(el("hr")); return i + 1; }
    if (QUOTE.test(line)) return renderQuote(lines, i, parent);
    if (LIST_ITEM.test(line)) return renderList(lines, i, parent);
    if (isTableStart(lines, i)) return renderTable(lines, i, parent);
    return renderParagraph(lines, i, parent);
  }

  function renderFence(lines, i, match, parent) {
    const marker = match[1];
    const body = [];
    let j = i + 1;
    // An unclosed fence runs to the end: that is what a half-streamed reply looks like.
    while (j < lines.length && !lines[j].trim().startsWith(marker)) body.push(lines[j++]);
    const code = el("code", match[2] ? "language-" + match[2] : null, [body.join("\n")]);
    const pre = el("pre", null, [code]);
    if (match[2]) pre.dataset.lang = match[2];
    parent.append(pre);
    return j + 1;
  }

  function renderQuote(lines, i, parent) {
    const body = [];
    let match;
    while (i < lines.length && (match = QUOTE.exec(lines[i]))) { body.push(match[1]); i++; }
    const quote = el("blockquote");
    renderBlocks(body, quote);
    parent.append(quote);
    return i;
  }

  function renderList(lines, i, parent) {
    const first = LIST_ITEM.exec(lines[i]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const list = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) list.start = parseInt(first[2], 10);
    while (i < lines.length) {
      const item = LIST_ITEM.exec(lines[i]);
      if (!item || item[1].length !== indent || /\d/.test(item[2]) !== ordered) break;
      const body = [item[3]];
      i++;
      // Continuation: indented lines (nested lists, wrapped text) and single blank lines inside.
      while (i < lines.length && isListContinuation(lines, i, indent)) body.push(dedent(lines[i++], indent + 2));
      const li = el("li");
      if (body.length === 1) li.append(...inline(body[0]));
      else renderBlocks(body, li);
      list.append(li);
      while (i < lines.length && lines[i].trim() === "" && LIST_ITEM.test(lines[i + 1] || "")) i++;
    }
    parent.append(list);
    return i;
  }

  function isListContinuation(lines, i, indent) {
    const line = lines[i];
    if (line.trim() === "") return /^\s+\S/.test(lines[i + 1] || "") && leadingSpaces(lines[i + 1]) > indent;
    return leadingSpaces(line) > indent;
  }

  function leadingSpaces(line) { return line.length - line.trimStart().length; }

  function dedent(line, count) {
    return line.slice(Math.min(count, leadingSpaces(line)));
  }

  function isTableStart(lines, i) {
    return lines[i].includes("|") && i + 1 < lines.length && lines[i + 1].includes("-") && TABLE_SEPARATOR.test(lines[i + 1]);
  }

  function tableCells(line) {
    return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((cell) => cell.trim());
  }

  function renderTable(lines, i, parent) {
    const head = el("tr", null, tableCells(lines[i]).map((cell) => el("th", null, inline(cell))));
    const body = el("tbody");
    i += 2;
    while (i < lines.length && lines[i].includes("|") && lines[i].trim() !== "") {
      body.append(el("tr", null, tableCells(lines[i++]).map((cell) => el("td", null, inline(cell)))));
    }
    parent.append(el("div", "table-wrap", [el("table", null, [el("thead", null, [head]), body])]));
    return i;
  }

  function startsBlock(lines, i) {
    const line = lines[i];
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
      LIST_ITEM.test(line) || isTableStart(lines, i);
  }

  function renderParagraph(lines, i, parent) {
    const paragraph = el("p");
    let first = true;
    while (i < lines.length && lines[i].trim() !== "" && (first || !startsBlock(lines, i))) {
      // Chat replies mean their line breaks (poems, addresses), so keep them.
      if (!first) paragraph.append(el("br"));
      paragraph.append(...inline(lines[i].trim()));
      first = false;
      i++;
    }
    parent.append(paragraph);
    return i;
  }

  // ---- inline -------------------------------------------------------------

  const INLINE_RULES = [
    { pattern: /`+/, build: codeSpan },
    { pattern: /\[([^\]\n]+)\]\(([^)\s]+)\)/, build: (m) => link(m[1], m[2], m[0]) },
    { pattern: /\*\*(?=\S)([\s\S]*?\S)\*\*|(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/, build: (m) => el("strong", null, inline(m[1] || m[2])) },
    { pattern: /~~(?=\S)([\s\S]*?\S)~~/, build: (m) => el("del", null, inline(m[1])) },
    { pattern: /\*(?=[^\s*])([^*]*?[^\s*])\*|(?<!\w)_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/, build: (m) => el("em", null, inline(m[1] || m[2])) },
    { pattern: /https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"]/, build: (m) => link(m[0], m[0], m[0]) },
  ];

  // Splits text at the earliest matching rule, builds that node, recurses on the rest.
  function inline(text) {
    const nodes = [];
    let rest = text;
    while (rest) {
      let best = null;
      for (const rule of INLINE_RULES) {
        const match = rule.pattern.exec(rest);
        if (match && (!best || match.index < best.match.index)) best = { rule, match };
      }
      if (!best) { nodes.push(document.createTextNode(rest)); break; }
      const { rule, match } = best;
      if (match.index > 0) nodes.push(document.createTextNode(rest.slice(0, match.index)));
      let built = rule.build(match, rest.slice(match.index));
      if (built instanceof Node) built = { node: built, length: match[0].length };
      nodes.push(built.node);
      rest = rest.slice(match.index + built.length);
    }
    return nodes;
  }

  function codeSpan(match, text) {
    const ticks = match[0];
    const end = text.indexOf(ticks, ticks.length);
    if (end < 0) return { node: document.createTextNode(ticks), length: ticks.length };
    return { node: el("code", null, [text.slice(ticks.length, end)]), length: end + ticks.length };
  }

  function link(label, url, source) {
    if (!SAFE_URL.test(url)) return document.createTextNode(source);
    const anchor = el("a", null, label === url ? [label] : inline(label));
    anchor.href = url;
    anchor.target = "_blank";
    anchor.rel = "noopener noreferrer";
    return anchor;
  }

  return { render };
})();
