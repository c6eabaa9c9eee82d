"use strict";
// The case-lookup page: the search form, an image query with a region box, the hit grid and
// the detail view. It talks to the web app's JSON API only (see xmodal/server/web/app.py).
(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("search-form");
  const textInput = $("text");
  const fileInput = $("file");
  const dropZone = $("drop-zone");
  const preview = $("preview");
  const previewImg = $("preview-img");
  const boxEl = $("box");
  const boxInputs = { x: $("box-left"), y: $("box-top"), w: $("box-width"), h: $("box-height") };
  const message = $("message");
  const summary = $("summary");
  const results = $("results");
  const detail = $("detail");
  const confirmButton = $("confirm");
  const confirmStatus = $("confirm-status");

  let upload = null; // the image file of the query
  let box = null; // the region of it to search with: {x, y, w, h} as fractions
  let queryWindow = ""; // the DICOM window the query is rendered with
  let previewUrl = null;
  let searched = null; // the query of the hits shown: {text} or {file, box, window, crop}
  let hits = [];
  let openIndex = -1;

  function el(tag, props = {}, ...children) {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  }

  async function api(url, body) {
    const init = body ? { method: "POST", body, headers: { "X-Xmodal": "1" } } : {};
    const response = await fetch(url, init);
    if (!response.ok) {
      let text = `${response.status} ${response.statusText}`;
      try {
        text = (await response.json()).error || text;
      } catch (_) {
        // not JSON: keep the status line
      }
      throw new Error(text);
    }
    return response;
  }

  function showError(text) {
    message.textContent = text;
    message.hidden = !text;
  }

  const imageUrl = (id, size, window) =>
    `/api/items/${encodeURIComponent(id)}/image?size=${size}` + (window ? `&window=${encodeURIComponent(window)}` : "");

  // -- the image query and its box ---------------------------------------------------------
  const clamp = (v, low, high) => Math.min(high, Math.max(low, v));

  function setBox(next, fromInputs = false) {
    if (next) {
      const w = clamp(next.w, 0.02, 1);
      const h = clamp(next.h, 0.02, 1);
      next = { x: clamp(next.x, 0, 1 - w), y: clamp(next.y, 0, 1 - h), w, h };
    }
    box = next;
    boxEl.hidden = !box;
    if (box) {
      Object.assign(boxEl.style, {
        left: `${box.x * 100}%`, top: `${box.y * 100}%`, width: `${box.w * 100}%`, height: `${box.h * 100}%`,
      });
    }
    if (!fromInputs) {
      for (const [key, input] of Object.entries(boxInputs)) input.value = box ? Math.round(box[key] * 100) : "";
    }
  }

  function boxFromInputs() {
    const values = Object.values(boxInputs).map((input) => input.value.trim());
    if (values.every((v) => v === "")) return setBox(null, true);
    const [x, y, w, h] = values.map((v, i) => (v === "" ? [0, 0, 100, 100][i] : Number(v)) / 100);
    if ([x, y, w, h].some(Number.isNaN)) return;
    setBox({ x, y, w, h }, true);
  }

  function fractionAt(event) {
    const rect = previewImg.getBoundingClientRect();
    return [clamp((event.clientX - rect.left) / rect.width, 0, 1), clamp((event.clientY - rect.top) / rect.height, 0, 1)];
  }

  let dragStart = null;
  preview.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    event.preventDefault();
    preview.focus();
    preview.setPointerCapture(event.pointerId);
    dragStart = fractionAt(event);
  });
  preview.addEventListener("pointermove", (event) => {
    if (!dragStart) return;
    const [x, y] = fractionAt(event);
    const [x0, y0] = dragStart;
    setBox({ x: Math.min(x, x0), y: Math.min(y, y0), w: Math.abs(x - x0), h: Math.abs(y - y0) });
  });
  preview.addEventListener("pointerup", () => {
    if (!dragStart) return;
    dragStart = null;
    if (box && (box.w <= 0.02 || box.h <= 0.02)) setBox(null); // a click, not a drag
  });
  preview.addEventListener("keydown", (event) => {
    const step = 0.02;
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (event.key in moves) {
      event.preventDefault();
      const [dx, dy] = moves[event.key];
      if (!box) setBox({ x: 0.25, y: 0.25, w: 0.5, h: 0.5 });
      else if (event.shiftKey) setBox({ ...box, w: box.w + dx, h: box.h + dy });
      else setBox({ ...box, x: box.x + dx, y: box.y + dy });
    } else if (event.key === "Delete" || event.key === "Backspace") {
      event.preventDefault();
      setBox(null);
    } else if (event.key === "Enter") {
      event.preventDefault();
      search();
    }
  });
  for (const input of Object.values(boxInputs)) input.addEventListener("input", boxFromInputs);

  async function renderPreview(file, window) {
    const body = new FormData();
    body.append("file", file);
    if (window) body.append("window", window);
    const response = await api("/api/preview", body);
    const dicom = response.headers.get("X-Xmodal-Dicom") === "1";
    const url = URL.createObjectURL(await response.blob());
    previewImg.src = url;
    await previewImg.decode().catch(() => {});
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = url;
    $("query-presets").hidden = !dicom;
  }

  async function loadImage(file) {
    showError("");
    try {
      queryWindow = "";
      await renderPreview(file, "");
    } catch (error) {
      showError(`Cannot show ${file.name}: ${error.message}`);
      return;
    }
    upload = file;
    textInput.value = "";
    setBox(null);
    $("query-image").hidden = false;
    await search();
  }

  function clearImage() {
    upload = null;
    fileInput.value = "";
    setBox(null);
    $("query-image").hidden = true;
    textInput.focus();
  }

  function cropCanvas() {
    const width = previewImg.naturalWidth;
    const height = previewImg.naturalHeight;
    const region = box || { x: 0, y: 0, w: 1, h: 1 };
    const sw = Math.max(1, Math.round(region.w * width));
    const sh = Math.max(1, Math.round(region.h * height));
    const scale = 480 / Math.max(sw, sh);
    const canvas = el("canvas", { width: Math.round(sw * scale), height: Math.round(sh * scale), className: "large" });
    canvas.getContext("2d").drawImage(previewImg, region.x * width, region.y * height, sw, sh, 0, 0, canvas.width, canvas.height);
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", box ? "The region of the query image" : "The query image");
    return canvas;
  }

  for (const name of ["dragenter", "dragover"]) {
    dropZone.addEventListener(name, (event) => {
      event.preventDefault();
      dropZone.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) dropZone.addEventListener(name, () => dropZone.classList.remove("over"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) loadImage(file);
  });
  // a file dropped beside the zone must not make the browser open it instead of the page
  for (const name of ["dragover", "drop"]) document.addEventListener(name, (event) => event.preventDefault());
  fileInput.addEventListener("change", () => {
    if (fileInput.files[0]) loadImage(fileInput.files[0]);
  });
  $("clear-box").addEventListener("click", () => setBox(null));
  $("clear-image").addEventListener("click", clearImage);
  $("query-presets").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-window]");
    if (!button || !upload) return;
    queryWindow = button.dataset.window;
    pressed($("query-presets"), button);
    renderPreview(upload, queryWindow).catch((error) => showError(error.message));
  });

  // -- searching -----------------------------------------------------------------------------
  function filters() {
    const where = {};
    for (const row of document.querySelectorAll(".filter")) {
      const name = row.dataset.field;
      const number = row.dataset.kind === "number";
      const part = (key) => row.querySelector(`[data-part="${key}"]`).value.trim();
      const bound = (v) => {
        if (v === "") return null;
        if (!number) return v;
        if (Number.isNaN(Number(v))) throw new Error(`Filter ${name}: "${v}" is not a number.`);
        return Number(v);
      };
      const values = part("values").split(",").map((v) => v.trim()).filter(Boolean);
      const [min, max] = [bound(part("min")), bound(part("max"))];
      if (values.length && (min !== null || max !== null)) {
        throw new Error(`Filter ${name}: give values or a range, not both.`);
      }
      if (values.length) where[name] = values;
      else if (min !== null || max !== null) where[name] = { min, max };
    }
    return Object.keys(where).length ? where : null;
  }

  function queryBody(query) {
    const body = new FormData();
    if (query.text !== undefined) {
      body.append("text", query.text);
      return body;
    }
    body.append("file", query.file);
    if (query.box) {
      const b = query.box;
      body.append("box", [b.x, b.y, b.x + b.w, b.y + b.h].map((v) => clamp(v, 0, 1).toFixed(5)).join(","));
    }
    if (query.window) body.append("window", query.window);
    return body;
  }

  async function search() {
    const text = textInput.value.trim();
    let query = null;
    if (text) query = { text };
    else if (upload) query = { file: upload, box, window: queryWindow, crop: cropCanvas() };
    if (!query) {
      showError("Type a description or drop an image to search with.");
      textInput.focus();
      return;
    }
    let where;
    try {
      where = filters();
    } catch (error) {
      showError(error.message);
      return;
    }
    const body = queryBody(query);
    body.append("target", $("target").value);
    body.append("k", $("k").value);
    if (where) body.append("where", JSON.stringify(where));
    showError("");
    summary.textContent = "Searching…";
    results.setAttribute("aria-busy", "true");
    try {
      const data = await (await api("/api/search", body)).json();
      searched = query;
      hits = data.hits;
      results.replaceChildren(...hits.map(hitCard));
      const took = `${data.timing.total_ms.toFixed(1)} ms on the server`;
      summary.textContent = hits.length
        ? `${hits.length} hits (${took}). Click a hit, or press Enter on it, to compare it with the query.`
        : `No hits (${took}).`;
    } catch (error) {
      summary.textContent = "";
      showError(error.message);
    } finally {
      results.removeAttribute("aria-busy");
    }
  }

  function hitCard(hit, index) {
    const button = el("button", { type: "button", className: "hit" });
    if (hit.thumbnail) {
      button.append(el("img", { src: hit.thumbnail, alt: hit.caption || `image ${hit.item_id}`, className: "thumb" }));
    } else {
      button.append(el("span", { className: "hit-text", textContent: hit.text }));
    }
    if (hit.modality === "image" && hit.caption) button.append(el("span", { className: "caption", textContent: hit.caption }));
    button.append(
      el("span", { className: "hit-line" }, el("span", { className: "score", textContent: hit.score.toFixed(3) }),
        el("span", { className: "muted", textContent: ` #${hit.rank} · ${hit.item_id}` })),
    );
    const fields = Object.entries(hit.metadata).slice(0, 4).map(([k, v]) => `${k}: ${v}`).join(" · ");
    if (fields) button.append(el("span", { className: "meta-line muted small", textContent: fields }));
    button.addEventListener("click", () => openDetail(index));
    return el("li", {}, button);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    search();
  });

  // -- the detail view -------------------------------------------------------------------------
  function pressed(group, button) {
    for (const b of group.querySelectorAll("button")) b.setAttribute("aria-pressed", String(b === button));
  }

  async function openDetail(index) {
    const hit = hits[index];
    openIndex = index;
    $("detail-title").textContent = `Hit #${hit.rank}: ${hit.item_id}`;
    $("detail-hit-title").textContent = `Hit (${hit.modality}, score ${hit.score.toFixed(3)})`;
    $("detail-query").replaceChildren(
      searched.text !== undefined ? el("blockquote", { textContent: searched.text }) : searched.crop,
    );
    const pane = $("detail-hit");
    if (hit.modality === "image") {
      pane.replaceChildren(el("img", { src: imageUrl(hit.item_id, 512, ""), alt: hit.caption || `image ${hit.item_id}`, className: "large" }));
    } else {
      pane.replaceChildren(el("p", { className: "report", textContent: hit.text }));
    }
    const rows = [["score", hit.score.toFixed(4)], ["source", hit.source], ...Object.entries(hit.metadata)];
    $("detail-meta").replaceChildren(
      ...rows.filter(([, v]) => v !== "" && v !== null).flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: String(v) })]),
    );
    const presets = $("detail-presets");
    presets.hidden = true;
    pressed(presets, null);
    confirmButton.disabled = false;
    confirmStatus.textContent = "";
    confirmStatus.className = "";
    if (!detail.open) detail.showModal();
    if (hit.modality === "image") {
      try {
        const info = await (await api(`/api/items/${encodeURIComponent(hit.item_id)}`)).json();
        if (openIndex === index) presets.hidden = !info.dicom;
      } catch (error) {
        confirmStatus.textContent = error.message;
      }
    }
  }

  $("detail-presets").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-window]");
    if (!button || openIndex < 0) return;
    pressed($("detail-presets"), button);
    $("detail-hit").querySelector("img").src = imageUrl(hits[openIndex].item_id, 512, button.dataset.window);
  });

  confirmButton.addEventListener("click", async () => {
    const hit = hits[openIndex];
    confirmButton.disabled = true;
    confirmStatus.className = "";
    confirmStatus.textContent = "Sending…";
    const body = queryBody(searched);
    body.append("relevant", hit.item_id);
    try {
      const data = await (await api("/api/feedback", body)).json();
      confirmStatus.className = "ok";
      confirmStatus.textContent = `Recorded: ${hit.item_id} is the matching case (feedback ${data.feedback_id}).`;
      const status = await (await api("/api/status")).json();
      const total = $("feedback-total");
      if (total) total.textContent = status.feedback_total;
    } catch (error) {
      confirmStatus.className = "error";
      confirmStatus.textContent = `Not recorded: ${error.message}`;
      confirmButton.disabled = false;
    }
  });

  $("close-detail").addEventListener("click", () => detail.close());
  detail.addEventListener("close", () => {
    const button = results.querySelectorAll("button.hit")[openIndex];
    openIndex = -1;
    if (button) button.focus();
  });

  showError(message.textContent.trim());
  textInput.focus();
})();
