// Tandem playground: ask the gateway (POST /v1/chat/completions) and show the answer with its citations;
// rate the answer or suggest a correction (POST /v1/feedback, with the same key).
"use strict";

const $ = (id) => document.getElementById(id);
const keyStore = "tandem-api-key";
let responseId = null; // the id of the answer on show: what feedback names

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || body.detail || resp.statusText;
  } catch (_) {
    return resp.statusText;
  }
}

async function loadModels() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) {
    setStatus("Could not list models: " + (await errorText(resp)), true);
    return;
  }
  const select = $("model");
  select.replaceChildren();
  const models = (await resp.json()).data;
  for (const m of models) {
    const opt = document.createElement("option");
    opt.value = m.id;
    const t = m.tandem;
    opt.textContent = t ? `${m.id} (adapter v${t.adapter_version ?? "-"})` : `${m.id} (base model)`;
    select.append(opt);
  }
  // Prefer an alias (a fine-tuned adapter) over the bare base model when one exists.
  const alias = models.find((m) => m.tandem);
  if (alias) select.value = alias.id;
}

// The answer as text, with [n] markers turned into links to citation n.
function renderAnswer(text, count) {
  const box = $("answer");
  box.replaceChildren();
  const parts = text.split(/(\[\d+\])/);
  for (const part of parts) {
    const m = /^\[(\d+)\]$/.exec(part);
    if (m && Number(m[1]) >= 1 && Number(m[1]) <= count) {
      const a = document.createElement("a");
      a.className = "cite";
      a.href = "#cite-" + m[1];
      a.textContent = part;
      box.append(a);
    } else {
      box.append(document.createTextNode(part));
    }
  }
}

function renderCitations(citations, cited = new Set(), attributed = new Set(), citedBy = "cited") {
  const list = $("citations");
  list.replaceChildren();
  for (const c of citations) {
    const li = document.createElement("li");
    li.id = "cite-" + c.index;
    li.value = c.index;
    const title = document.createElement("strong");
    const marks = [cited.has(c.index) ? citedBy : "", attributed.has(c.index) ? "holds the answer's words" : ""];
    const mark = marks.filter(Boolean).join(", ");
    title.textContent = (c.title || c.document_path) + (mark ? ` (${mark})` : "");
    const path = document.createElement("div");
    path.className = "path";
    path.textContent = c.source ? `${c.source}: ${c.document_path}` : c.document_path;
    li.append(title, path);
    if (c.heading) {
      const heading = document.createElement("div");
      heading.className = "heading";
      heading.textContent = c.heading;
      li.append(heading);
    }
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `chunk ${c.chunk_id}` + (typeof c.score === "number" ? ` · score ${c.score.toFixed(3)}` : "");
    li.append(score);
    list.append(li);
  }
  if (!citations.length) {
    const li = document.createElement("li");
    li.textContent = "No citations (retrieval off, or nothing relevant found).";
    list.append(li);
  }
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  const body = {
    model: $("model").value,
    messages: [{ role: "user", content: question }],
    max_tokens: Number($("max-tokens").value) || 128,
    rag: $("rag").checked,
  };
  $("send").disabled = true;
  setStatus("Thinking…");
  const started = performance.now();
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!resp.ok) {
      setStatus(`Error ${resp.status}: ${await errorText(resp)}`, true);
      return;
    }
    const data = await resp.json();
    resetFeedback(data.id);
    // "retrieved": every source the model was given; "citations": the ones its answer cites; "attributions":
    // the ones whose text holds the answer's sentences (the gateway's check, whatever the answer cites).
    const sources = data.retrieved || data.citations || [];
    renderAnswer(data.choices[0].message.content || "", sources.length);
    const indexes = (list) => new Set((list || []).map((c) => c.index));
    const t = data.tandem || {};
    // The gateway writes the markers of an answer that cited nothing itself (tandem.gateway_cited).
    const citedBy = (t.gateway_cited || []).includes(0) ? "cited by the gateway" : "cited";
    renderCitations(sources, indexes(data.citations), indexes(data.attributions), citedBy);
    const served = $("served");
    served.textContent = `served by ${t.served_model || data.model}` +
      (t.adapter_version ? ` (adapter v${t.adapter_version})` : "") +
      (t.fallback ? " · adapter unavailable, base model answered" : "") +
      ` · retrieval ${t.rag ? "on" : "off"} · ${((performance.now() - started) / 1000).toFixed(1)} s`;
    served.className = t.fallback ? "meta fallback" : "meta";
    $("result").hidden = false;
    setStatus("");
  } catch (err) {
    setStatus("The gateway could not be reached: " + err, true);
  } finally {
    $("send").disabled = false;
  }
}

function setFeedbackStatus(text, isError) {
  $("feedback-status").textContent = text;
  $("feedback-status").className = isError ? "error" : "";
}

function resetFeedback(id) {
  responseId = id || null;
  for (const b of ["rate-up", "rate-down"]) $(b).setAttribute("aria-pressed", "false");
  for (const b of ["rate-up", "rate-down", "suggest"]) $(b).disabled = !responseId;
  $("correction-form").hidden = true;
  $("correction").value = "";
  setFeedbackStatus("");
}

async function sendFeedback(rating, correction) {
  if (!responseId) return false;
  const body = { response_id: responseId, rating };
  if (correction) body.correction = correction;
  try {
    const resp = await fetch("/v1/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!resp.ok) {
      setFeedbackStatus(`Feedback not recorded (${resp.status}): ${await errorText(resp)}`, true);
      return false;
    }
    const data = await resp.json();
    $("rate-up").setAttribute("aria-pressed", String(rating === "up"));
    $("rate-down").setAttribute("aria-pressed", String(rating === "down"));
    if (!correction) setFeedbackStatus("Thanks, your rating is recorded.");
    else if (data.example) setFeedbackStatus(
      data.example.duplicate ? `This correction is already in review (${data.example.status}).`
        : "Thanks, your correction waits for a reviewer.");
    else setFeedbackStatus(data.note || "Thanks, your correction is recorded.");
    return true;
  } catch (err) {
    setFeedbackStatus("The gateway could not be reached: " + err, true);
    return false;
  }
}

async function sendCorrection(event) {
  event.preventDefault();
  const text = $("correction").value.trim();
  if (!text) return;
  $("send-correction").disabled = true;
  try {
    if (await sendFeedback("down", text)) $("correction-form").hidden = true;
  } finally {
    $("send-correction").disabled = false;
  }
}

// A key handed over in the URL fragment (`tandem up` prints http://HOST:PORT/#key=...): the browser never sends
// the fragment to the server. Keep it in localStorage and take it out of the address bar and history.
function keyFromFragment() {
  const params = new URLSearchParams(window.location.hash.slice(1));
  const key = (params.get("key") || "").trim();
  if (!key) return;
  localStorage.setItem(keyStore, key);
  history.replaceState(null, "", window.location.pathname + window.location.search);
}

keyFromFragment();
$("api-key").value = localStorage.getItem(keyStore) || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem(keyStore, $("api-key").value.trim());
  loadModels();
});
$("ask").addEventListener("submit", ask);
$("rate-up").addEventListener("click", () => sendFeedback("up"));
$("rate-down").addEventListener("click", () => sendFeedback("down"));
$("suggest").addEventListener("click", () => {
  $("correction-form").hidden = false;
  $("correction").focus();
});
$("correction-form").addEventListener("submit", sendCorrection);
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask").requestSubmit();
});
loadModels();
