// vllm-pelrp web view: ask for an explained completion, draw the explanation, reopen recent
// ones by id. Plain browser JavaScript, no build step, no outside requests: it talks only to
// the server that served it (/v1/models, /v1/chat/completions, /v1/explain, /v1/explanations).
// On a server with --api-key it asks for the key when the server answers 401 and sends it as a
// bearer token (kept in this tab's sessionStorage only). It remembers the ids of the
// explanations it made (localStorage) and lists those: the server lists only ids it is named.
// It is also the only HTML renderer of an explanation: Explanation.to_html() (html_page.py)
// inlines this script and the explanation's JSON into index.html (element #explanation); the
// script then draws that explanation and talks to no server, so the file opens offline.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  // source colours (documents 1, 2, ...): distinct on white, readable as thin underlines
  const PALETTE = ["#1a7f37", "#8250df", "#bc4c00", "#0969da", "#bf3989", "#4d2d00", "#1b7c83", "#9a6700"];
  const POS = [220, 38, 38];
  const NEG = [37, 99, 235];
  // wire format 2.1: the targets of an encoder (all its tokens are input)
  const ENCODER_TARGETS = ["dimension", "similarity", "label"];

  let modelName = null;
  let current = null;  // the explanation on screen
  // a page written by Explanation.to_html(): the explanation is embedded, there is no server
  const embedded = document.getElementById("explanation");
  // what the heatmap shows: one relevance field, of the summed target or of one per-token row
  const VIEWS = [["combined", "combined_relevance"], ["token", "token_relevance"],
                 ["positional", "positional_relevance"], ["token type", "token_type_relevance"]];
  const state = {view: "combined_relevance", row: -1};
  let topK = 10;
  const KEY_ITEM = "pelrp-api-key";
  const IDS_ITEM = "pelrp-explanation-ids";
  const MAX_IDS = 100;

  // ---- talking to the server --------------------------------------------------------------
  class ServerError extends Error {
    constructor(status, message, param) {
      super(`${status}: ${message}`);
      this.status = status;
      this.param = param;
    }
  }

  async function request(path, body) {
    const headers = body === undefined ? {} : {"content-type": "application/json"};
    const key = sessionStorage.getItem(KEY_ITEM);
    if (key) headers.authorization = `Bearer ${key}`;
    const init = body === undefined ? {headers} : {
      method: "POST", headers, body: JSON.stringify(body)};
    const response = await fetch(path, init);
    let data = null;
    try { data = await response.json(); } catch (e) { /* not JSON */ }
    if (response.status === 401) {
      askForKey(key ? "the server refused this API key" : "this server needs an API key");
    }
    if (!response.ok) {
      const error = data && data.error;
      const message = error ? (error.message || (typeof error === "string" ? error
        : JSON.stringify(error))) : response.statusText;
      throw new ServerError(response.status, message, error && error.param);
    }
    return data;
  }

  function askForKey(reason) {
    $("key-form").hidden = false;
    $("key-reason").textContent = `${reason} (vLLM --api-key):`;
    $("api-key").focus();
  }

  function rememberId(id) {
    if (!id) return;
    const ids = knownIds().filter((known) => known !== id);
    ids.unshift(id);
    localStorage.setItem(IDS_ITEM, JSON.stringify(ids.slice(0, MAX_IDS)));
  }

  function knownIds() {
    try {
      const ids = JSON.parse(localStorage.getItem(IDS_ITEM) || "[]");
      return Array.isArray(ids) ? ids.filter((id) => typeof id === "string") : [];
    } catch (e) { return []; }
  }

  async function servedModel() {
    if (modelName === null) {
      const models = await request("/v1/models");
      modelName = models.data[0].id;
      $("model-name").textContent = modelName;
    }
    return modelName;
  }

  async function explainFromForm() {
    const prompt = $("prompt").value.trim();
    const documents = Array.from(document.querySelectorAll(".document textarea"))
      .map((area) => area.value.trim()).filter((text) => text.length > 0);
    const completion = $("completion").value;
    const threshold = $("threshold").value.trim();
    const mode = $("mode").value;
    const model = await servedModel();
    const messages = [{role: "user", content: prompt}];
    const grounding = {};
    if (documents.length) grounding.documents = documents;
    if (threshold !== "") grounding.grounding_threshold = Number(threshold);

    if (completion.trim() !== "") {  // explain the given answer: nothing generated
      return request("/v1/explain", {model, messages, completion, mode, ...grounding});
    }
    const data = await request("/v1/chat/completions", {
      model, messages, temperature: 0,
      max_tokens: Number($("max-tokens").value) || 40,
      explain: {mode, ...grounding},
    });
    const explanation = data.choices[0].explanation;
    if (!explanation || explanation.error) {
      throw new Error(explanation ? explanation.error : "the response carries no explanation");
    }
    return explanation;
  }

  // ---- the form -----------------------------------------------------------------------------
  function addDocument(text) {
    const box = document.createElement("div");
    box.className = "document";
    const head = document.createElement("div");
    head.className = "doc-head";
    const label = document.createElement("label");
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove-document";
    remove.textContent = "Remove";
    remove.addEventListener("click", () => { box.remove(); numberDocuments(); });
    const area = document.createElement("textarea");
    area.rows = 3;
    area.placeholder = "Document text (rendered into the prompt as a source)";
    area.value = text || "";
    head.append(label, remove);
    box.append(head, area);
    $("documents").append(box);
    numberDocuments();
    area.focus();
  }

  function numberDocuments() {
    document.querySelectorAll(".document").forEach((box, i) => {
      const id = `document-${i + 1}`;
      box.style.setProperty("--doc-colour", PALETTE[i % PALETTE.length]);
      box.querySelector("label").textContent = `Document ${i + 1}`;
      box.querySelector("label").htmlFor = id;
      box.querySelector("textarea").id = id;
    });
  }

  function setBusy(busy, message) {
    $("submit").disabled = busy;
    $("status").className = "muted";
    $("status").textContent = message || "";
  }

  function showError(error) {
    $("status").className = "error";
    $("status").textContent = error.message || String(error);
  }

  async function onSubmit(event) {
    event.preventDefault();
    const started = performance.now();
    setBusy(true, "Explaining…");
    const timer = setInterval(() => {
      $("status").textContent = `Explaining… ${((performance.now() - started) / 1000).toFixed(0)} s`;
    }, 1000);
    try {
      const explanation = await explainFromForm();
      rememberId(explanation.id);
      render(explanation);
      if (explanation.id) history.pushState(null, "", `?id=${encodeURIComponent(explanation.id)}`);
      setBusy(false, `Done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
      loadRecent();
    } catch (error) {
      setBusy(false);
      showError(error);
    } finally {
      clearInterval(timer);
    }
  }

  // ---- recent explanations ----------------------------------------------------------------
  async function loadRecent() {
    // ids are capabilities: the server lists only the ids this browser made and names here
    // (with --api-key, those that the key may read)
    const ids = knownIds();
    let data = {data: []};
    if (ids.length) {
      try {
        data = await request(`/v1/explanations?ids=${encodeURIComponent(ids.join(","))}`);
      } catch (error) { return; }
    }
    const list = $("recent-list");
    list.replaceChildren();
    if (!data.data.length) {
      const empty = document.createElement("li");
      empty.className = "muted";
      empty.textContent = "None yet: the explanations you make are listed here.";
      list.append(empty);
    }
    for (const item of data.data) {
      const li = document.createElement("li");
      if (current && current.id === item.id) li.className = "current";
      const link = document.createElement("a");
      link.href = `?id=${encodeURIComponent(item.id)}`;
      link.textContent = item.id;
      link.addEventListener("click", (event) => {
        event.preventDefault();
        history.pushState(null, "", link.href);
        openById(item.id);
      });
      const preview = document.createElement("span");
      preview.className = "preview";
      preview.textContent = item.other !== undefined && item.other !== null
        ? `${item.prompt} ≈ ${item.other}`
        : item.kind === "image" ? item.prompt : `${item.prompt} → ${item.completion}`;
      preview.title = preview.textContent;
      const meta = document.createElement("span");
      meta.className = "muted";
      const when = new Date(item.created * 1000).toLocaleTimeString();
      const grounded = item.grounding_score === null ? ""
        : ` · grounding ${item.grounding_score.toFixed(2)}${item.low_grounding ? " (low)" : ""}`;
      const target = ENCODER_TARGETS.includes(item.target_kind) && item.target_value !== null &&
        item.target_value !== undefined ? ` · ${item.target_kind} ${Number(item.target_value).toFixed(3)}` : "";
      const size = item.kind === "image" ? `${item.num_tokens} patches` : `${item.num_tokens} tokens`;
      meta.textContent = `${when} · ${item.mode} · ${size}${target}${grounded}`;
      li.append(link, preview, meta);
      list.append(li);
    }
  }

  async function openById(id) {
    id = id.trim();
    if (!id) return;
    setBusy(true, `Opening ${id}…`);
    try {
      render(await request(`/v1/explanations/${encodeURIComponent(id)}`));
      rememberId(id);
      setBusy(false);
      loadRecent();
    } catch (error) {
      setBusy(false);
      showError(error);
    }
  }

  // ---- drawing ------------------------------------------------------------------------------
  function colour(value, strength) {
    const rgb = value >= 0 ? POS : NEG;
    const alpha = Math.min(1, Math.abs(value)) * (strength === undefined ? 0.85 : strength);
    return `rgba(${rgb[0]}, ${rgb[1]}, ${rgb[2]}, ${alpha.toFixed(3)})`;
  }

  const number = (v, digits) => (v === null || v === undefined) ? "–" : Number(v).toFixed(digits === undefined ? 4 : digits);
  const percent = (v) => `${(100 * v).toFixed(1)} %`;

  // wire format 2.1: encoder targets and an additive position table
  const isEncoder = (explanation) => ENCODER_TARGETS.includes(explanation.target.kind);
  const SIDE_NAMES = {main: "query", other: "document"};
  const sideData = (side) => (side === "other" ? current.other : current);
  function partLabel(part) {
    return part.kind === "rotary" ? part.name : `${part.name} (${part.kind} position table)`;
  }
  function positionTable(explanation) {
    const kinds = (explanation.positional_parts || []).filter((part) => part.kind !== "rotary")
      .map((part) => part.kind);
    return kinds.length ? kinds.join(" / ") : null;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // token text made visible: a newline is "⏎" and a line break, a tab "⇥", other control
  // characters \xNN, the empty token "∅" (as the terminal view shows them)
  function displayToken(text) {
    if (text === "") return "∅";
    let out = "";
    for (const ch of text.replace(/\r\n/g, "\n")) {
      const code = ch.codePointAt(0);
      if (ch === "\n") out += "⏎\n";
      else if (ch === "\t") out += "⇥";
      else if (ch === "\r") out += "↵";
      else if (code < 32 || code === 127) out += `\\x${code.toString(16).padStart(2, "0")}`;
      else out += ch;
    }
    return out;
  }

  function shortToken(text, limit) {
    const shown = displayToken(text).replace(/\n/g, "");
    return shown.length > limit ? `${shown.slice(0, limit - 1)}…` : shown;
  }

  const sidesShown = () => (current.other ? ["main", "other"] : ["main"]);
  const viewName = () => VIEWS.find(([, field]) => field === state.view)[0];
  // the numbers shown for a side: a selected per-token row's, else the explanation's own
  function relevanceOf(side) {
    const shown = sideData(side);
    return side === "main" && state.row >= 0 && shown.rows ? shown.rows[state.row] : shown;
  }
  const viewValues = (side) => relevanceOf(side)[state.view] || [];
  // one scale for every side shown (a similarity's two halves are in the same units)
  function viewScale() {
    let top = 0;
    for (const side of sidesShown()) {
      for (const value of viewValues(side)) if (Number.isFinite(value)) top = Math.max(top, Math.abs(value));
    }
    return top;
  }
  const scaled = (value, top) => (top > 0 && Number.isFinite(value) ? value / top : 0);

  function chip(text, value, title) {
    const node = element("span", "chip", shortToken(text, 20));
    node.style.backgroundColor = colour(value);
    if (title) node.title = title;
    return node;
  }

  function tableHead(table, names) {
    const head = element("tr");
    for (const name of names) head.append(element("th", name.startsWith("#") || name === "pos" ? "num" : "", name));
    table.append(head);
  }

  // source index of each token position (-1: none)
  function sourceOfToken(explanation) {
    const owner = new Array(explanation.tokens.length).fill(-1);
    const grounding = explanation.grounding;
    if (grounding) {
      grounding.sources.forEach((source, k) => {
        for (let i = source.token_start; i < source.token_end && i < owner.length; i++) owner[i] = k;
      });
    }
    return owner;
  }

  // ---- image explanations (ImageExplanation, wire format 1.x): grids, not tokens ------------
  const isImage = (explanation) => Boolean(explanation.patch_relevance);

  // one canvas per grid, a pixel per cell (CSS scales it without smoothing); hovering a cell
  // gives its value
  function drawGrid(box, name, rows, columns, values, underlay) {
    const top = Math.max(0, ...values.flat().map((v) => Math.abs(v)));
    const figure = element("figure");
    figure.dataset.grid = name;
    const canvas = document.createElement("canvas");
    canvas.width = columns;
    canvas.height = rows;
    canvas.style.height = `${Math.round(240 * rows / columns)}px`;
    const context = canvas.getContext("2d");
    context.fillStyle = "#ffffff";
    context.fillRect(0, 0, columns, rows);
    values.forEach((row, r) => row.forEach((value, c) => {
      context.fillStyle = colour(scaled(value, top), 1);
      context.fillRect(c, r, 1, 1);
    }));
    canvas.addEventListener("mousemove", (event) => {
      const area = canvas.getBoundingClientRect();
      const c = Math.min(columns - 1, Math.floor((event.clientX - area.left) / area.width * columns));
      const r = Math.min(rows - 1, Math.floor((event.clientY - area.top) / area.height * rows));
      canvas.title = `${name} row ${r}, column ${c}: ${number(values[r][c], 6)}`;
    });
    figure.append(element("figcaption", "", `${name} · ${rows}×${columns} · max |R| ${number(top, 6)}`));
    if (underlay) {  // the image as the model saw it, the grid over it
      const stack = element("div", "overlay");
      const picture = document.createElement("img");
      picture.src = underlay;
      picture.alt = "the explained image";
      stack.append(picture, canvas);
      figure.append(stack);
    } else {
      figure.append(canvas);
    }
    box.append(figure);
  }

  function tokenChips(box, tokens, values) {
    box.replaceChildren();
    const top = Math.max(0, ...values.map((v) => Math.abs(v)));
    tokens.forEach((token, i) => {
      const node = chip(token, scaled(values[i], top), `${token}: ${number(values[i], 6)}`);
      node.dataset.index = i;
      box.append(node);
    });
  }

  function renderImage(explanation) {
    current = explanation;
    const section = $("result");
    section.hidden = false;
    section.dataset.state = "rendering";
    $("result-id").textContent = explanation.id || "";
    $("text-view").hidden = true;
    $("grounding").hidden = true;
    $("image-view").hidden = false;
    const [height, width] = explanation.image_size;
    $("result-meta").textContent = `${explanation.model} · ${explanation.mode} · ` +
      `${explanation.target.description} · image ${height}×${width}, patches of ` +
      `${explanation.patch_size} px`;
    const grids = $("image-grids");
    grids.replaceChildren();
    const patches = explanation.patch_relevance;
    const positions = explanation.positional_relevance;
    const image = typeof explanation.image === "string" &&
      explanation.image.startsWith("data:image/png;base64,") ? explanation.image : null;
    drawGrid(grids, "patches", patches.rows, patches.columns, patches.values, image);
    drawGrid(grids, "positions", positions.rows, positions.columns, positions.values);
    drawGrid(grids, "pixels", height, width, explanation.pixel_relevance);
    const given = (value) => value !== null && value !== undefined;
    const prefix = [];
    if (given(explanation.class_token_relevance)) {
      prefix.push(`class token ${number(explanation.class_token_relevance, 6)} (its position ` +
                  `${number(explanation.class_positional_relevance, 6)})`);
    }
    if (given(explanation.distillation_token_relevance)) {
      prefix.push(`distillation token ${number(explanation.distillation_token_relevance, 6)}`);
    }
    $("image-prefix").textContent = prefix.join(" · ");
    const text = explanation.text;
    $("image-text").hidden = !text;
    if (text) {
      tokenChips($("image-text-tokens"), text.tokens, text.token_relevance);
      tokenChips($("image-text-positions"), text.tokens.map((_, i) => `#${i}`),
                 text.positional_relevance);
    }
    const table = $("conservation");
    table.replaceChildren();
    tableHead(table, ["", "image", ...(text ? ["text"] : [])]);
    const sides = [explanation.conservation, ...(text ? [text.conservation] : [])];
    for (const [label, field] of [["explained", "explained"], ["Σ input relevance", "input_sum"],
                                  ["softmax absorbed", "softmax_absorbed"],
                                  ["bias absorbed", "bias_absorbed"]]) {
      const tr = element("tr");
      tr.append(element("td", "", label));
      for (const side of sides) tr.append(element("td", "num", number(side[field], 6)));
      table.append(tr);
    }
    const tr = element("tr");
    tr.append(element("td", "", "relative error excl. softmax"));
    for (const side of sides) {
      tr.append(element("td", "num", Number(side.relative_error_excluding_softmax).toExponential(1)));
    }
    table.append(tr);
    section.dataset.state = "done";
    section.dataset.explanationId = explanation.id || "";
  }

  function render(explanation) {
    if (isImage(explanation)) {
      renderImage(explanation);
      return;
    }
    $("text-view").hidden = false;
    $("image-view").hidden = true;
    current = explanation;
    state.row = -1;
    const section = $("result");
    section.hidden = false;
    section.dataset.state = "rendering";
    $("result-id").textContent = explanation.id || "";
    const completionTokens = explanation.tokens.length - explanation.prompt_length;
    const target = explanation.target;
    if (explanation.other) {
      $("result-meta").textContent = `${explanation.model} · ${explanation.mode} · similarity: ` +
        `cosine ${number(target.value)} · query ${explanation.tokens.length} + document ` +
        `${explanation.other.tokens.length} tokens · each text explains half`;
    } else if (isEncoder(explanation)) {
      $("result-meta").textContent = `${explanation.model} · ${explanation.mode} · ` +
        `${target.description} · ${explanation.tokens.length} input tokens · target value ` +
        `${number(explanation.target_logit, 3)}`;
    } else {
      $("result-meta").textContent = `${explanation.model} · ${explanation.mode} · ` +
        `${target.description} · ${explanation.prompt_length} prompt + ` +
        `${completionTokens} completion tokens · target logit ${number(explanation.target_logit, 3)}`;
    }
    const table = positionTable(explanation);
    $("positional-legend").textContent = table
      ? `per position: the relevance of its row of the ${table} position table ` +
        "(position_embedding: one table added to the token embedding, no layers)"
      : "per position (sum over layers of the RoPE cos and sin parts)";
    renderGrounding(explanation);
    renderViewSelect(explanation);
    renderHeatmap(explanation);
    renderRows(explanation);
    paintTokens();
    renderPositional(explanation);
    renderLayers(explanation);
    renderConservation(explanation);
    section.dataset.state = "done";
    section.dataset.explanationId = explanation.id || "";
  }

  function renderHeatmap(explanation) {
    const box = $("heatmap");
    box.replaceChildren();
    box.classList.toggle("pair", Boolean(explanation.other));
    if (explanation.other) {  // a similarity: query and document side by side
      for (const [side, shown] of [["main", explanation], ["other", explanation.other]]) {
        const column = element("div", "side");
        column.dataset.side = side;
        box.append(column);
        drawTokens(column, shown, side, side === "other" ? "Document" : "Query");
      }
      return;
    }
    drawTokens(box, explanation, "main");
  }

  function drawTokens(box, explanation, side, label) {
    const owner = sourceOfToken(explanation);
    const sources = explanation.grounding ? explanation.grounding.sources : [];
    const count = explanation.tokens.length;
    const parts = label ? [[label, 0, count]]
      : isEncoder(explanation) ? [["Input", 0, count]]
      : [["Prompt", 0, explanation.prompt_length], ["Completion", explanation.prompt_length, count]];
    for (const [name, start, end] of parts) {
      box.append(element("div", "part-label", `${name} · tokens ${start}–${Math.max(start, end - 1)}`));
      const flow = element("div", "tokens");
      flow.dataset.part = name.toLowerCase();
      for (let i = start; i < end; i++) {
        const token = explanation.tokens[i];
        const span = element("span", "tok", displayToken(token.text));
        span.dataset.index = String(i);
        if (side === "other") span.dataset.side = side;
        if (/^<\|.*\|>$/.test(token.text)) span.classList.add("special");
        if (owner[i] >= 0) {
          span.classList.add("in-source");
          span.style.setProperty("--src-colour", PALETTE[owner[i] % PALETTE.length]);
          span.dataset.source = sources[owner[i]].name;
        }
        flow.append(span);
      }
      box.append(flow);
    }
  }

  // ---- the relevance shown: field selector, per-token rows, colours -------------------------
  function renderViewSelect(explanation) {
    const box = $("view-select");
    box.replaceChildren();
    const types = Boolean(explanation.token_type_relevance ||
      (explanation.other && explanation.other.token_type_relevance));
    if (state.view === "token_type_relevance" && !types) state.view = "combined_relevance";
    for (const [name, field] of VIEWS) {
      if (field === "token_type_relevance" && !types) continue;
      const option = element("label");
      const input = element("input");
      input.type = "radio";
      input.name = "view";
      input.value = field;
      input.checked = field === state.view;
      input.addEventListener("change", () => { state.view = field; paintTokens(); });
      option.append(input, element("span", "", name));
      box.append(option);
    }
  }

  // colour the tokens (and the top-token table) by the view's relevance, |value| / max |value|
  function paintTokens() {
    const top = viewScale();
    document.querySelectorAll("#heatmap .tok").forEach((span) => {
      const side = span.dataset.side === "other" ? "other" : "main";
      span.style.backgroundColor = colour(scaled(viewValues(side)[Number(span.dataset.index)], top));
    });
    $("max-abs").textContent = number(top);
    document.querySelectorAll("#view-name, .view-name").forEach((node) => { node.textContent = viewName(); });
    const row = state.row >= 0 && current.rows ? current.rows[state.row] : null;
    $("row-shown").hidden = !row;
    $("row-label").textContent = row ? `row ${state.row}: ${row.target.description}` : "";
    document.querySelectorAll("#rows tr.row").forEach((tr) => {
      tr.classList.toggle("selected", Number(tr.dataset.row) === state.row);
    });
    renderTopTokens(top);
  }

  function renderTopTokens(top) {
    const box = $("top-tokens");
    box.replaceChildren();
    box.classList.toggle("pair", Boolean(current.other));
    $("top-tokens-section").hidden = topK === 0;
    for (const side of sidesShown()) {
      const shown = sideData(side), numbers = relevanceOf(side), values = viewValues(side);
      const encoder = isEncoder(shown), types = numbers.token_type_relevance;
      const column = element("div", "side");
      column.dataset.side = side;
      if (current.other) column.append(element("div", "part-label", SIDE_NAMES[side]));
      const table = element("table", "top-tokens");
      tableHead(table, ["#", "pos", ...(encoder ? [] : ["role"]), "token", viewName(), "token rel.",
        "positional rel.", ...(types ? ["token-type rel."] : [])]);
      const order = values.map((value, i) => i)
        .sort((a, b) => Math.abs(values[b]) - Math.abs(values[a])).slice(0, topK);
      order.forEach((i, rank) => {
        const token = shown.tokens[i];
        const row = element("tr");
        const cell = element("td");
        cell.append(chip(token.text, scaled(values[i], top)));
        row.append(element("td", "num", String(rank + 1)), element("td", "num", String(i)),
          ...(encoder ? [] : [element("td", "", token.role)]), cell,
          element("td", "num", number(values[i])), element("td", "num", number(numbers.token_relevance[i])),
          element("td", "num", number(numbers.positional_relevance[i])),
          ...(types ? [element("td", "num", number(types[i]))] : []));
        table.append(row);
      });
      column.append(table);
      box.append(column);
    }
  }

  // (text, id) of the token whose logit is a per-token row's target
  function rowTargetToken(explanation, row) {
    const id = row.target.token_ids.length ? row.target.token_ids[0] : null;
    if (row.target.span) {
      const token = explanation.tokens[explanation.prompt_length + row.target.span[0]];
      if (token && token.id === id) return [token.text, id];
    }
    const found = explanation.tokens.slice(explanation.prompt_length).find((token) => token.id === id);
    return [found ? found.text : `<id ${id}>`, id];
  }

  function renderRows(explanation) {
    const rows = explanation.rows || [];
    $("rows-section").hidden = rows.length === 0;
    const table = $("rows");
    table.replaceChildren();
    if (!rows.length) return;
    tableHead(table, ["row", "pos", "target token", "logit", "rel. error", "top 3 input tokens (combined)"]);
    rows.forEach((row, k) => {
      const [text, id] = rowTargetToken(explanation, row);
      const values = row.combined_relevance;
      // the inputs the target can see: up to its last position
      const seen = (row.target.positions.length ? Math.max(...row.target.positions) : values.length - 1) + 1;
      const top = Math.max(0, ...values.map(Math.abs));
      const inputs = element("td");
      values.slice(0, seen).map((value, i) => i).sort((a, b) => Math.abs(values[b]) - Math.abs(values[a]))
        .slice(0, 3).forEach((i) => inputs.append(
          chip(explanation.tokens[i].text, scaled(values[i], top), `#${i} combined ${number(values[i])}`)));
      const target = element("td");
      target.append(chip(text, 0), element("span", "muted", ` id ${id}`));
      const tr = element("tr", "row");
      tr.dataset.row = String(k);
      tr.append(element("td", "num", String(k)), element("td", "num", row.target.positions.join(",")), target,
        element("td", "num", number(row.target_logit)), element("td", "num", number(row.conservation.relative_error)),
        inputs);
      tr.addEventListener("click", () => { state.row = state.row === k ? -1 : k; paintTokens(); });
      table.append(tr);
    });
  }

  // positional relevance per layer (RoPE models with per_layer): rows layers, columns positions
  function renderLayers(explanation) {
    const layers = explanation.other ? [] : (explanation.positional_relevance_per_layer || []);
    $("layers").hidden = layers.length === 0;
    const box = $("layer-plot");
    box.replaceChildren();
    const sums = $("layer-sums");
    sums.replaceChildren();
    if (!layers.length) return;
    const count = explanation.tokens.length;
    const width = Math.max(300, box.clientWidth || 1000);
    const left = 48, right = 8, cell = Math.max(6, Math.min(14, 300 / layers.length));
    const height = cell * layers.length + 24;
    const step = (width - left - right) / Math.max(1, count);
    const signed = layers.map((layer) => layer.cos.map((cos, i) => (cos || 0) + (layer.sin[i] || 0)));
    const top = Math.max(0, ...signed.map((values) => Math.max(0, ...values.map(Math.abs))));
    const every = Math.max(1, Math.ceil(layers.length / 15));
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "positional relevance per layer and position");
    const add = (parent, tag, attributes, text) => {
      const node = document.createElementNS(SVG, tag);
      for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
      if (text !== undefined) node.textContent = text;
      parent.append(node);
      return node;
    };
    layers.forEach((layer, r) => {
      const y = 6 + r * cell;
      if (r % every === 0) {
        add(svg, "text", {class: "axis-label", x: left - 4, y: y + cell - 3, "text-anchor": "end"}, `L${layer.layer}`);
      }
      signed[r].forEach((value, i) => {
        if (value === 0) return;
        const rect = add(svg, "rect", {class: "layer-cell", x: left + i * step, y, width: step, height: cell,
          fill: colour(scaled(value, top), 1)});
        rect.dataset.layer = String(layer.layer);
        rect.dataset.index = String(i);
        add(rect, "title", {}, `layer ${layer.layer}, #${i}: cos ${number(layer.cos[i])}, sin ${number(layer.sin[i])}`);
      });
    });
    if (!isEncoder(explanation) && explanation.prompt_length > 0 && explanation.prompt_length < count) {
      const x = left + explanation.prompt_length * step;
      add(svg, "line", {class: "axis", x1: x, x2: x, y1: 2, y2: height - 16, "stroke-dasharray": "4 3"});
    }
    add(svg, "text", {class: "axis-label", x: left, y: height - 4}, "position 0");
    add(svg, "text", {class: "axis-label", x: width - right, y: height - 4, "text-anchor": "end"}, String(count - 1));
    box.append(svg);
    tableHead(sums, ["layer", "Σ|cos|", "Σ|sin|"]);
    const mass = (values) => values.reduce((total, value) => total + Math.abs(value), 0);
    for (const layer of layers) {
      const row = element("tr");
      row.append(element("td", "num", String(layer.layer)), element("td", "num", number(mass(layer.cos))),
                 element("td", "num", number(mass(layer.sin))));
      sums.append(row);
    }
  }

  function renderGrounding(explanation) {
    const grounding = explanation.grounding;
    const box = $("grounding");
    box.hidden = !grounding;
    const bars = $("source-bars");
    bars.replaceChildren();
    $("sentences").replaceChildren();
    if (!grounding) return;
    $("grounding-score").textContent = grounding.grounding_score.toFixed(2);
    const badge = $("grounding-badge");
    badge.className = `badge ${grounding.low_grounding ? "low" : "ok"}`;
    badge.textContent = grounding.low_grounding ? "low grounding" : "grounded";
    $("grounding-threshold").textContent =
      `share of the prompt's relevance on the sources · threshold ${grounding.threshold}`;

    const addBar = (label, colourCss, tokenShare, positionalShare, value, extraClass, title) => {
      const name = element("div", `bar-label ${extraClass || ""}`);
      const dot = element("span", "dot");
      dot.style.background = colourCss;
      name.append(dot, document.createTextNode(label));
      name.title = title || label;
      const track = element("div", `bar-track ${extraClass || ""}`);
      const tokenPart = element("div", "bar-token");
      tokenPart.style.width = `${Math.max(0, 100 * tokenShare)}%`;
      tokenPart.style.background = colourCss;
      const positionalPart = element("div", "bar-positional");
      positionalPart.style.width = `${Math.max(0, 100 * positionalShare)}%`;
      positionalPart.style.background = colourCss;
      track.append(tokenPart, positionalPart);
      track.title = `token ${percent(tokenShare)} + positional ${percent(positionalShare)}`;
      bars.append(name, track, element("div", `bar-value ${extraClass || ""}`, value));
      return track;
    };
    grounding.sources.forEach((source, k) => {
      const track = addBar(source.name, PALETTE[k % PALETTE.length], source.token_share,
        source.positional_share, `${percent(source.share)} (token ${percent(source.token_share)}, ` +
        `positional ${percent(source.positional_share)})`, "",
        `${source.name} · ${source.kind} · tokens ${source.token_start}–${source.token_end} · ` +
        `signed relevance ${number(source.token_relevance + source.positional_relevance)}`);
      track.classList.add("source-bar");
      track.dataset.source = String(source.index);
    });
    addBar("instructions & question", "#8c959f", grounding.instruction_share, 0,
      `${percent(grounding.instruction_share)} (tokens outside the sources)`, "bar-other");
    addBar("positional structure", "#57606a", 0, grounding.positional_share,
      `${percent(grounding.positional_share)} (positions outside the sources)`, "bar-other");

    if (grounding.sentences && grounding.sentences.length) {
      const table = element("table");
      const head = element("tr");
      for (const title of ["#", "completion sentence", "grounding", "supported by"]) head.append(element("th", "", title));
      table.append(head);
      for (const sentence of grounding.sentences) {
        const row = element("tr");
        const names = sentence.supporting_sources.map((k) => grounding.sources[k].name).join(", ");
        row.append(element("td", "num", String(sentence.index)), element("td", "", sentence.text.trim()),
                   element("td", "num", sentence.grounding_score.toFixed(2)),
                   element("td", "", names || "none"));
        table.append(row);
      }
      $("sentences").append(table);
    }
  }

  function renderPositional(explanation) {
    const box = $("positional-plot");
    box.replaceChildren();
    box.classList.toggle("pair", Boolean(explanation.other));
    if (explanation.other) {
      for (const [side, shown] of [["main", explanation], ["other", explanation.other]]) {
        const column = element("div", "side");
        column.dataset.side = side;
        column.append(element("div", "part-label", SIDE_NAMES[side]));
        box.append(column);
        drawPositional(column, shown, side);
      }
      return;
    }
    drawPositional(box, explanation, "main");
  }

  function drawPositional(box, explanation, side) {
    const values = explanation.positional_relevance;
    const count = values.length;
    const width = Math.max(300, box.clientWidth || 1000);
    const height = 170, left = 48, right = 8, top = 10, bottom = 22;
    const plotWidth = width - left - right, middle = top + (height - top - bottom) / 2;
    const half = (height - top - bottom) / 2;
    // scale: the largest |value|; when one position dwarfs all others (often position 0, the
    // attention sink) the scale follows the runner-up and that bar is clipped and labelled
    const sizes = values.map(Math.abs).sort((a, b) => b - a);
    const clipped = sizes.length > 1 && sizes[0] > 4 * sizes[1] && sizes[1] > 0;
    const largest = Math.max(1e-12, clipped ? 1.25 * sizes[1] : sizes[0]);
    const step = plotWidth / Math.max(1, count);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "positional relevance per position");
    const add = (tag, attributes, text) => {
      const node = document.createElementNS(SVG, tag);
      for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
      if (text !== undefined) node.textContent = text;
      svg.append(node);
      return node;
    };
    // background bands: each source, and the completion
    if (explanation.grounding) {
      explanation.grounding.sources.forEach((source, k) => {
        add("rect", {x: left + source.token_start * step, y: top, height: height - top - bottom,
          width: (source.token_end - source.token_start) * step,
          fill: PALETTE[k % PALETTE.length], "fill-opacity": 0.1});
      });
    }
    const encoder = isEncoder(explanation);
    if (!encoder) {
      add("rect", {x: left + explanation.prompt_length * step, y: top, height: height - top - bottom,
        width: (count - explanation.prompt_length) * step, fill: "#8c959f", "fill-opacity": 0.12});
    }
    add("line", {class: "axis", x1: left, x2: width - right, y1: middle, y2: middle});
    const bars = add("g", {class: "pos-bars"});
    values.forEach((value, i) => {
      const size = Math.min(1, Math.abs(value) / largest) * half;
      const bar = document.createElementNS(SVG, "rect");
      bar.setAttribute("x", left + i * step);
      bar.setAttribute("width", Math.max(0.6, step * 0.85));
      bar.setAttribute("y", value >= 0 ? middle - size : middle);
      bar.setAttribute("height", Math.max(0.5, size));
      bar.setAttribute("fill", colour(value >= 0 ? 1 : -1, 0.85));
      bar.dataset.index = String(i);
      bars.append(bar);
      if (Math.abs(value) > largest) {  // clipped: say how large it really is
        add("text", {class: "axis-label clip-label", x: left + i * step + Math.max(4, step),
          y: value >= 0 ? top + 10 : height - bottom - 3}, `${value.toPrecision(3)} (clipped)`);
      }
    });
    add("text", {class: "axis-label", x: left - 4, y: top + 9, "text-anchor": "end"}, `+${largest.toPrecision(2)}`);
    add("text", {class: "axis-label", x: left - 4, y: middle + 4, "text-anchor": "end"}, "0");
    add("text", {class: "axis-label", x: left - 4, y: height - bottom, "text-anchor": "end"}, `−${largest.toPrecision(2)}`);
    add("text", {class: "axis-label", x: left, y: height - 6}, "position 0");
    if (!encoder) {
      add("text", {class: "axis-label", x: left + explanation.prompt_length * step + 3, y: top + 10},
          `completion from ${explanation.prompt_length}`);
    }
    add("text", {class: "axis-label", x: width - right, y: height - 6, "text-anchor": "end"}, String(count - 1));
    add("line", {class: "cursor plot-cursor", id: side === "other" ? "plot-cursor-other" : "plot-cursor",
                 x1: -10, x2: -10, y1: top, y2: height - bottom});
    svg.addEventListener("mousemove", (event) => {
      const box = svg.getBoundingClientRect();
      const x = (event.clientX - box.left) * (width / box.width);
      const index = Math.floor((x - left) / step);
      if (index >= 0 && index < count) showTip(index, event, side); else hideTip();
    });
    svg.dataset.side = side;
    svg.addEventListener("mouseleave", hideTip);
    box.append(svg);
    svg.dataset.step = String(step);
    svg.dataset.left = String(left);
  }

  function positionalShare(explanation) {
    const mass = (values) => values.reduce((total, value) => total + Math.abs(value), 0);
    const token = mass(explanation.token_relevance), positional = mass(explanation.positional_relevance);
    return token + positional > 0 ? positional / (token + positional) : 0;
  }

  function conservationRows(explanation) {
    const c = explanation.conservation;
    const encoder = isEncoder(explanation);
    const types = explanation.token_type_relevance;
    return [
      [encoder ? (explanation.target.kind === "similarity" ? "this text explains (½ cosine)"
        : "target value") : "target logit", number(c.target_logit)],
      ["Σ token relevance", number(c.token_sum)],
      ["Σ positional relevance", number(c.positional_sum)],
      ...(explanation.positional_parts || []).map((part) =>
        [`  Σ ${encoder ? partLabel(part) : part.name}`, number(part.relevance.reduce((a, b) => a + b, 0))]),
      ...(types ? [["Σ token-type relevance", number(c.token_type_sum || 0)]] : []),
      ["relative error |Σ − logit| / |logit|", number(c.relative_error)],
      ["absorbed by the softmax rule", number(c.softmax_absorbed)],
      ...(c.bias_absorbed ? [["kept by biases", number(c.bias_absorbed)]] : []),
      ["relative error without the softmax and bias parts", number(c.relative_error_excluding_softmax)],
      ["positional share (of |token| + |positional|)", percent(positionalShare(explanation))],
      ["tokens", encoder ? `${explanation.tokens.length} input` : `${explanation.prompt_length} ` +
        `prompt + ${explanation.tokens.length - explanation.prompt_length} completion`],
    ];
  }

  function renderConservation(explanation) {
    const table = $("conservation");
    table.replaceChildren();
    if (explanation.other) {  // name | query | document
      const head = element("tr");
      head.append(element("th", "", `cosine similarity ${number(explanation.target.value)}`),
                  element("th", "num", "query"), element("th", "num", "document"));
      table.append(head);
      const other = conservationRows(explanation.other);
      conservationRows(explanation).forEach(([name, value], k) => {
        const row = element("tr");
        row.append(element("td", "", name), element("td", "num", value),
                   element("td", "num", other[k] ? other[k][1] : "–"));
        table.append(row);
      });
      return;
    }
    for (const [name, value] of conservationRows(explanation)) {
      const row = element("tr");
      row.append(element("td", "", name), element("td", "num", value));
      table.append(row);
    }
  }

  // ---- hover --------------------------------------------------------------------------------
  function showTip(index, event, side) {
    if (!current) return;
    side = side === "other" && current.other ? "other" : "main";
    const shown = sideData(side);
    const token = shown.tokens[index];
    if (!token) return;
    const tip = $("tooltip");
    tip.replaceChildren();
    const numbers = relevanceOf(side);
    const types = numbers.token_type_relevance;
    const rows = [
      ["token", `${current.other ? SIDE_NAMES[side] + " " : ""}#${index} · ${isEncoder(shown) ? "input" : token.role}`],
      ["text", null],
      ["id", String(token.id)],
      ...(numbers !== shown ? [["target", `row ${state.row}: ${numbers.target.description}`]] : []),
      ["token relevance", number(numbers.token_relevance[index])],
      ["positional relevance", number(numbers.positional_relevance[index])],
      // wire format 2: the positional relevance by named input (rope_cos, rope_sin, position_embedding)
      ...(numbers.positional_parts || []).map((part) => [`  ${part.name}`, number(part.relevance[index])]),
      ...(types ? [["token-type relevance", number(types[index])]] : []),
      ["combined", number(numbers.combined_relevance[index], 3)],
    ];
    const owner = sourceOfToken(shown)[index];
    if (owner >= 0) rows.push(["source", shown.grounding.sources[owner].name]);
    const table = element("table");
    for (const [name, value] of rows) {
      const row = element("tr");
      const cell = element("td");
      if (value === null) cell.append(element("span", "tip-text", JSON.stringify(token.text)));
      else cell.textContent = value;
      row.append(element("td", "", name), cell);
      table.append(row);
    }
    tip.append(table);
    tip.hidden = false;
    const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    const y = event.clientY + 16 + tip.offsetHeight > window.innerHeight
      ? event.clientY - tip.offsetHeight - 10 : event.clientY + 16;
    tip.style.left = `${x}px`;
    tip.style.top = `${y}px`;
    document.querySelectorAll(".tok.active").forEach((n) => n.classList.remove("active"));
    const span = document.querySelector(side === "other" ? `.tok[data-side="other"][data-index="${index}"]`
      : `.tok[data-index="${index}"]:not([data-side="other"])`);
    if (span) span.classList.add("active");
    const svg = document.querySelector(`#positional-plot svg${side === "other" ? '[data-side="other"]' : ""}`);
    const cursor = document.getElementById(side === "other" ? "plot-cursor-other" : "plot-cursor");
    if (svg && cursor) {
      const x0 = Number(svg.dataset.left) + (index + 0.4) * Number(svg.dataset.step);
      cursor.setAttribute("x1", x0);
      cursor.setAttribute("x2", x0);
    }
  }

  function hideTip() {
    $("tooltip").hidden = true;
    document.querySelectorAll(".tok.active").forEach((n) => n.classList.remove("active"));
    document.querySelectorAll(".plot-cursor").forEach((cursor) => {
      cursor.setAttribute("x1", -10);
      cursor.setAttribute("x2", -10);
    });
  }

  // ---- start --------------------------------------------------------------------------------
  function openFromLocation() {
    const id = new URLSearchParams(location.search).get("id");
    if (id) openById(id);
  }

  $("ask-form").addEventListener("submit", onSubmit);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_ITEM, $("api-key").value.trim());
    $("api-key").value = "";
    $("key-form").hidden = true;
    $("status").textContent = "";
    modelName = null;
    servedModel().catch(() => {});
    loadRecent();
    openFromLocation();
  });
  $("add-document").addEventListener("click", () => addDocument(""));
  $("open-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("open-id").value.trim();
    if (!id) return;
    history.pushState(null, "", `?id=${encodeURIComponent(id)}`);
    openById(id);
  });
  $("heatmap").addEventListener("mouseover", (event) => {
    const span = event.target.closest(".tok");
    if (span) showTip(Number(span.dataset.index), event, span.dataset.side || "main");
  });
  $("heatmap").addEventListener("mouseleave", hideTip);
  $("row-reset").addEventListener("click", () => { state.row = -1; paintTokens(); });
  if (embedded) {  // a file written by Explanation.to_html(): draw it, ask no server anything
    const explanation = JSON.parse(embedded.textContent);
    topK = Math.max(0, Number(embedded.dataset.topK || 10));
    for (const id of ["ask", "recent", "key-form"]) $(id).hidden = true;
    document.body.dataset.view = "file";
    $("model-name").textContent = explanation.model;
    render(explanation);
  } else {
    window.addEventListener("popstate", openFromLocation);
    servedModel().catch(() => {});
    loadRecent();
    openFromLocation();
  }
})();
