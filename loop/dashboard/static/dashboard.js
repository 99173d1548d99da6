// cloudlab dashboard: polls /api/state and renders it; operators approve or reject proposals.
// Plain JavaScript, no libraries. The token comes from the link's #token=... fragment (never
// sent in a URL to the server) and is kept in sessionStorage for this tab.
"use strict";

const POLL_MS = 2000;
let token = sessionStorage.getItem("cloudlab-token") || "";
if (location.hash.startsWith("#token=")) {
  token = decodeURIComponent(location.hash.slice(7));
  sessionStorage.setItem("cloudlab-token", token);
  history.replaceState(null, "", location.pathname);
}
let role = null;

function $(id) { return document.getElementById(id); }
function fmt(x, digits = 4) { return x === null || x === undefined ? "-" : Number(x).toPrecision(digits); }
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined || text === "" ? "-" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}
function fill(tableId, items, render) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren();
  for (const item of items) {
    const tr = document.createElement("tr");
    render(tr, item);
    body.appendChild(tr);
  }
}
function predicted(mean, std) { return mean === null || mean === undefined ? "-" : fmt(mean) + " ± " + fmt(std, 2); }

async function api(path, body) {
  const init = { headers: { "Authorization": "Bearer " + token } };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail || response.statusText);
  return data;
}

async function decide(verb, ids) {
  try {
    const done = await api("/api/" + verb, { ids: ids, note: $("note").value || null, by: $("by").value || null });
    $("error").hidden = true;
    $("updated").textContent = verb + "d: " + done.decided.join(", ");
  } catch (err) {
    $("error").textContent = verb + " refused: " + err.message;
    $("error").hidden = false;
  }
  await refresh();
}

function render(s) {
  role = s.role;
  $("title").textContent = "campaign " + s.name;
  $("role").textContent = s.role;
  $("operator-hint").hidden = s.role === "operator";
  $("objective").textContent = s.objective;
  $("state").textContent = s.state;
  $("progress").textContent = s.n_measured + " / " + s.budget;
  $("best-label").textContent = "best " + s.best.target;
  $("best").textContent = s.best.value === null ? "-" :
    fmt(s.best.value) + (s.best.unit ? " " + s.best.unit : "") + " (" + s.best.candidate_id + ")";
  $("counts").textContent = Object.entries(s.counts).sort().map(([k, v]) => k + " " + v).join(", ") || "no jobs yet";
  const waiting = s.proposals.filter((p) => p.status === "PROPOSED");
  $("n-pending").textContent = String(waiting.length);
  fill("pending", waiting, (tr, p) => {
    const d = p.detail;
    cell(tr, p.candidate_id);
    cell(tr, d.formula);
    cell(tr, d.model_version === null ? "initial design" : "v" + d.model_version);
    cell(tr, d.acquisition + (d.acquisition_value === null ? "" : " " + fmt(d.acquisition_value)));
    cell(tr, predicted(d.predicted_mean && d.predicted_mean[0], d.predicted_std && d.predicted_std[0]));
    cell(tr, p.proposed_at.slice(0, 19));
    cell(tr, d.scope, "scope");
    const td = cell(tr, "");
    td.textContent = "";
    for (const verb of ["approve", "reject"]) {
      const b = document.createElement("button");
      b.textContent = verb;
      b.className = verb;
      b.dataset.id = p.candidate_id;
      b.disabled = s.role !== "operator";
      b.addEventListener("click", () => decide(verb, [p.candidate_id]));
      td.appendChild(b);
    }
  });
  fill("jobs", s.jobs.slice().reverse(), (tr, j) => {
    tr.dataset.id = j.candidate_id;
    cell(tr, j.candidate_id);
    cell(tr, j.formula);
    cell(tr, j.state, "state-" + j.state);
    cell(tr, j.fidelity || "-");
    cell(tr, j.model_version === null ? "-" : "v" + j.model_version);
    cell(tr, j.acquisition);
    cell(tr, predicted(j.predicted_mean, j.predicted_std));
    cell(tr, j.measured === null ? "-" : fmt(j.measured) + (j.unit ? " " + j.unit : ""));
    cell(tr, j.message);
  });
  fill("calibration", s.calibration, (tr, c) => {
    cell(tr, "v" + c.version); cell(tr, c.surrogate); cell(tr, c.n); cell(tr, fmt(c.nll, 3));
    cell(tr, c.coverage90 === null ? "-" : Math.round(100 * c.coverage90) + " %");
    cell(tr, fmt(c.mae)); cell(tr, fmt(c.mean_std));
  });
  fill("versions", s.model_versions, (tr, v) => {
    cell(tr, "v" + v.version); cell(tr, v.n_train + " measurements"); cell(tr, v.created_at.slice(0, 19));
  });
  fill("failures", s.failures, (tr, f) => { cell(tr, f.candidate_id); cell(tr, f.state, "state-" + f.state); cell(tr, f.reason); });
  fill("audit", s.proposals.filter((p) => p.status !== "PROPOSED"), (tr, p) => {
    cell(tr, p.candidate_id); cell(tr, p.status.toLowerCase(), "state-" + p.status);
    cell(tr, p.decided_by); cell(tr, (p.decided_at || "").slice(0, 19)); cell(tr, p.note);
  });
}

async function refresh() {
  if (!token) {
    $("error").textContent = "no token: open the watcher or operator link that `cloudlab dashboard` printed";
    $("error").hidden = false;
    return;
  }
  try {
    render(await api("/api/state"));
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    $("error").hidden = true;
  } catch (err) {
    $("error").textContent = "cannot read the campaign: " + err.message;
    $("error").hidden = false;
  }
}

refresh();
setInterval(refresh, POLL_MS);
