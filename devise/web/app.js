// The devise search page: reads the query from the URL, asks /api, draws a grid of thumbnails.
"use strict";
const $ = (id) => document.getElementById(id);
const grid = $("grid"), statusLine = $("status"), errorLine = $("error");

function showError(message) {
  errorLine.textContent = message;
  errorLine.hidden = !message;
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function card(hit) {
  const el = document.createElement("figure");
  el.className = "card";
  el.dataset.id = hit.id;
  el.title = hit.path;
  const img = document.createElement("img");
  img.src = `/api/image/${encodeURIComponent(hit.id)}?size=192`;
  img.alt = hit.class_name || hit.label || hit.path;
  img.loading = "lazy";
  const meta = document.createElement("figcaption");
  const file = hit.path.split("/").pop();
  meta.innerHTML = `<div class="meta"><span class="rank">#${hit.rank}</span>` +
    `<span class="score">${hit.score.toFixed(3)}</span></div>` +
    `<div class="label"></div><div class="file"></div>`;
  meta.querySelector(".label").textContent = hit.class_name || hit.label || "-";
  if (hit.class_name && hit.label && hit.label !== hit.class_name) meta.querySelector(".label").title = hit.label;
  meta.querySelector(".file").textContent = file;
  el.append(img, meta);
  el.addEventListener("click", () => navigate({ similar: hit.id, name: file }));
  return el;
}

function draw(answer, title) {
  grid.replaceChildren(...answer.results.map(card));
  statusLine.textContent = `${title}: ${answer.results.length} results (version ${answer.version}, model ${answer.model_id})`;
}

async function run(params) {
  const k = params.get("k") || $("k").value || "12";
  $("k").value = k;
  $("q").value = params.get("q") || "";
  showError("");
  try {
    if (params.get("similar")) {
      const id = params.get("similar");
      const answer = await getJSON(`/api/similar/${encodeURIComponent(id)}?k=${encodeURIComponent(k)}`);
      draw(answer, `Images similar to ${params.get("name") || id}`);
      grid.dataset.mode = "similar";
    } else if (params.get("q")) {
      const q = params.get("q");
      const answer = await getJSON(`/api/search?q=${encodeURIComponent(q)}&k=${encodeURIComponent(k)}`);
      draw(answer, `"${q}"`);
      grid.dataset.mode = "search";
    }
  } catch (err) {
    grid.replaceChildren();
    statusLine.textContent = "";
    showError(err.message);
  }
}

// The URL holds the query, so a search can be shared and the back button works.
function navigate(values) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(values)) if (value) params.set(key, value);
  params.set("k", $("k").value || "12");
  history.pushState(null, "", `/?${params}`);
  run(params);
}

$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = $("q").value.trim();
  if (q) navigate({ q });
});

$("file").addEventListener("change", async () => {
  const file = $("file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  form.append("k", $("k").value || "12");
  showError("");
  try {
    draw(await getJSON("/api/search/image", { method: "POST", body: form }), `Images like ${file.name}`);
    grid.dataset.mode = "image";
  } catch (err) {
    showError(err.message);
  }
  $("file").value = "";
});

window.addEventListener("popstate", () => run(new URLSearchParams(location.search)));

getJSON("/api/info").then((info) => {
  $("info").textContent = `${info.rows} images · version ${info.version} · model ${info.model_id}` +
    (info.text_space ? ` · text space ${info.text_space}` : "");
  $("k").max = info.max_k;
}).catch((err) => showError(err.message));

run(new URLSearchParams(location.search));
