// The skinfusion page: upload one image to /v1/explain and show what the model says. No libraries,
// nothing loaded from elsewhere. Server data is only ever set as text, never as HTML.
"use strict";
const $ = (id) => document.getElementById(id);
let model = null;
let apiKey = sessionStorage.getItem("skinfusion-key") || "";

function headers() { return apiKey ? { "X-API-Key": apiKey } : {}; }
function pct(p) { return p == null ? "n/a" : p.toFixed(3); }

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// An error answer as one readable sentence: the server's {"detail": ...}, or what went wrong.
async function readError(res) {
  let detail = "";
  try { detail = (await res.json()).detail || ""; } catch (e) { /* not JSON */ }
  if (res.status === 401) {
    $("keybox").hidden = false;
    return "This server needs an API key. Enter it above and try again.";
  }
  if (res.status === 413) return detail || "The image is too large for this server.";
  if (res.status === 422 || res.status === 415) return "The image could not be used: " + (detail || "unreadable file");
  return `The server answered ${res.status}` + (detail ? `: ${detail}` : ".");
}

async function loadModel() {
  let res;
  try { res = await fetch("/v1/model", { headers: headers() }); }
  catch (e) { $("model").textContent = "server unreachable"; return; }
  if (!res.ok) { $("model").textContent = "model: " + (res.status === 401 ? "API key needed" : res.status); await readError(res); return; }
  model = await res.json();
  $("model").textContent = `${model.views.join(" + ")} · ${model.method} fusion · threshold ${model.threshold.toFixed(3)}` +
    (model.ood_gate.present ? " · OOD gate" : " · no OOD gate");
  $("mid").textContent = "model " + model.model_id.slice(0, 12);
  $("caveat").textContent = model.calibration_caveat;
  const fields = model.metadata_fields || [];
  $("meta").hidden = fields.length === 0;
  for (const f of ["age", "sex", "site"]) $("f-" + f).hidden = !fields.includes(f);
  const list = $("sites");
  list.replaceChildren(...(model.known_sites || []).map((s) => Object.assign(document.createElement("option"), { value: s })));
}

function figure(src, title, caption) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + src;
  img.alt = title;
  const cap = document.createElement("figcaption");
  const strong = document.createElement("strong");
  strong.textContent = title;
  cap.append(strong, document.createElement("br"), caption);
  fig.append(img, cap);
  return fig;
}

let photoUrl = null;

// Hide and empty the previous result, so that a new error can never sit under (or beside) the old
// image's probability, not even in the page's text that a screen reader or a copy would pick up.
function clearResult() {
  $("result").hidden = true;
  for (const id of ["fname", "fused", "decision", "thr", "ood", "warnings", "timing"]) $(id).textContent = "";
  $("decision").className = "pill";
  $("decision").hidden = false;
  $("fused").className = "";
  $("verdict-label").textContent = "fused melanoma probability";
  $("branchtable").classList.remove("greyed");
  $("fusedbar").style.width = "0";
  for (const id of ["branches", "views", "heatmaps"]) $(id).replaceChildren();
  $("photo").removeAttribute("src");
  if (photoUrl) { URL.revokeObjectURL(photoUrl); photoUrl = null; }  // the old upload's blob is freed
}

function render(r, file, warnings) {
  clearResult();
  photoUrl = URL.createObjectURL(file);
  $("photo").src = photoUrl;
  $("fname").textContent = r.filename;
  // An image the OOD gate (or an image check) flags gets no decision: the refusal is the headline,
  // with no badge and no probability; the model's raw output is only mentioned, greyed, below.
  const withheld = r.decision == null;
  const d = $("decision");
  if (withheld) {
    $("verdict-label").textContent = "no decision for this image";
    $("fused").textContent = "withheld";
    $("fused").className = "withheld";
    d.hidden = true;
    $("branchtable").classList.add("greyed");
  } else {
    $("fused").textContent = pct(r.melanoma_probability);
    d.textContent = r.decision;
    d.className = "pill " + r.decision;
    $("fusedbar").style.width = (100 * r.melanoma_probability).toFixed(1) + "%";
  }
  $("thrmark").style.left = (100 * r.threshold).toFixed(1) + "%";
  $("thr").textContent = r.threshold.toFixed(3);
  const ood = $("ood");
  if (r.out_of_distribution === true) {
    ood.className = "ood out";
    ood.textContent = "Out of distribution: this image looks unlike the training images (" +
      r.ood_reason_text.join("; ") + "), so the model gives no decision for it. Its raw output (" +
      pct(r.raw_melanoma_probability) + ") is not a probability to trust.";
  } else if (r.out_of_distribution === false) {
    ood.className = "ood in";
    ood.textContent = "In distribution: the image looks like the training images" +
      (r.in_distribution_score == null ? "." : ` (typicality ${r.in_distribution_score.toFixed(2)}, 1 = most typical).`);
  } else {
    ood.className = "ood unknown";
    ood.textContent = "Out-of-distribution check unavailable: this model has no feature-level gate; the image-level checks passed.";
  }
  const rows = Object.entries(r.branch_probabilities).map(([view, p]) => {
    const tr = document.createElement("tr");
    const bar = document.createElement("div");
    bar.className = "mini";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = (100 * p).toFixed(1) + "%";
    bar.append(fill);
    const cells = [view, pct(p)].map((t) => Object.assign(document.createElement("td"), { textContent: t }));
    cells[1].className = "num";
    const last = document.createElement("td");
    last.append(bar);
    tr.append(...cells, last);
    return tr;
  });
  $("branches").replaceChildren(...rows);
  const views = [figure(r.image_png, "image", "as the branches see it (resized)")];
  for (const [view, v] of Object.entries(r.views)) views.push(figure(v.png, view + " view", v.caption));
  $("views").replaceChildren(...views);
  $("heatmaps").replaceChildren(...Object.entries(r.heatmaps).map(([view, h]) =>
    figure(h.png, `${view} branch · p = ${pct(r.branch_probabilities[view])}` +
      (h.threshold == null ? "" : ` (its threshold ${h.threshold.toFixed(3)})`),
      (h.over === "spectrum" ? "over the spectrum (centre = low frequencies)" : "over the image") +
      (h.empty ? " · EMPTY: no region raises the melanoma logit (a limit of Grad-CAM, not proof of nothing)" : ""))));
  $("warnings").textContent = (warnings || []).join(" ");
  $("timing").textContent = `answered in ${Math.round(r.timing_ms.total)} ms · model ${r.model_id.slice(0, 12)}`;
  $("result").hidden = false;
}

async function send(file) {
  showError("");
  if (!file) return;
  clearResult();  // from here on, only this request's answer (or its error) is on the page
  const form = new FormData();
  form.append("files", file, file.name);
  for (const f of (model && model.metadata_fields) || []) {
    const v = $(f).value.trim();
    if (v) form.append(f, v);
  }
  $("busy").hidden = false;
  try {
    let res;
    try { res = await fetch("/v1/explain", { method: "POST", body: form, headers: headers() }); }
    catch (e) { showError("Cannot reach the skinfusion server. Is it still running?"); return; }
    if (!res.ok) { showError(await readError(res)); return; }
    const body = await res.json();
    render(body.images[0], file, body.warnings);
    if (!model) loadModel();
  } finally {
    $("busy").hidden = true;
  }
}

const drop = $("drop");
drop.addEventListener("click", () => $("file").click());
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
$("file").addEventListener("change", (e) => { send(e.target.files[0]); e.target.value = ""; });
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", (e) => {
  send(e.dataTransfer.files[0]);  // one image at a time: the first of several
});
$("keysave").addEventListener("click", () => {
  apiKey = $("key").value.trim();
  sessionStorage.setItem("skinfusion-key", apiKey);
  showError("");
  loadModel();
});
loadModel();
