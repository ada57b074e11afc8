"use strict";
// The page of `prmtool view` and `prmtool review`. The rows come as JSON, one list per column
// (prmtool/cli/view.py: page_rows); only one page of responses is in the document at a time,
// so filtering and paging 10,000 responses stays quick. Every text goes in as textContent,
// never as HTML: a response may hold any markup.

const DATA = JSON.parse(document.getElementById("data").textContent);
const COLUMNS = DATA.rows.columns;
const ROWS = DATA.rows.count;
const REVIEW = DATA.review; // {token, endpoint, reviewed} in `prmtool review`, else null
const FIRST_ERRORS = DATA.first_error_columns;
const state = {
  answer: "all", column: "", value: "", disagree: false, compareA: "", compareB: "",
  reviewed: "all", order: (REVIEW && REVIEW.order) || "input", search: "", page: 0,
};
let visible = []; // row indices that pass the filters, in the chosen order

function cell(column, row) {
  const values = COLUMNS[column];
  return values === undefined ? undefined : values[row];
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function option(select, value, label) {
  const node = element("option", "", label);
  node.value = value;
  select.appendChild(node);
}

function formatNumber(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) ? String(value) : value.toPrecision(3).replace(/\.?0+$/, "");
}

function describeFirstError(value) {
  if (value === null || value === undefined) return "not labelled";
  return value < 0 ? "no error" : "step " + value;
}

// --- shading -----------------------------------------------------------------------------

function shade(value) {
  const scale = DATA.color;
  if (!scale || value === null || value === undefined) return "";
  if (scale.kind === "labels") {
    if (value === true || value === 1) return "hsl(130, 50%, 88%)";
    if (value === false || value === 0) return "hsl(0, 80%, 90%)";
    return "";
  }
  const share = Math.min(1, Math.max(0, (value - scale.low) / (scale.high - scale.low)));
  return `hsl(${Math.round(120 * share)}, 65%, 87%)`;
}

function legend() {
  const scale = DATA.color;
  const node = document.getElementById("legend");
  if (!scale) { node.textContent = "no step column to shade by"; return; }
  node.append("shaded by " + scale.column + ": ");
  if (scale.kind === "labels") {
    const good = element("span", "chip", "good"); good.style.background = shade(1); good.style.color = "#1d2330";
    const bad = element("span", "chip", "bad"); bad.style.background = shade(0); bad.style.color = "#1d2330";
    node.append(good, " ", bad);
    return;
  }
  const bar = element("span", "bar");
  bar.style.background = `linear-gradient(to right, ${shade(scale.low)}, ${shade((scale.low + scale.high) / 2)}, ${shade(scale.high)})`;
  node.append(formatNumber(scale.low), bar, formatNumber(scale.high));
}

// --- filters and order -------------------------------------------------------------------

function valuesOf(column) {
  if (FIRST_ERRORS.includes(column)) {
    return [["error", "an error (≥ 0)"], ["none", "no error (-1)"], ["missing", "not labelled"]];
  }
  const seen = new Set(COLUMNS[column] || []);
  const values = [...seen].filter((v) => v !== null).sort().map((v) => [String(v), String(v)]);
  return seen.has(null) ? values.concat([["missing", "none"]]) : values;
}

function matchesValue(row) {
  if (!state.column) return true;
  const value = cell(state.column, row);
  if (state.value === "missing") return value === null || value === undefined;
  if (FIRST_ERRORS.includes(state.column)) {
    if (state.value === "error") return value !== null && value >= 0;
    if (state.value === "none") return value === -1;
    return String(value) === state.value;
  }
  return value !== null && String(value) === state.value;
}

function disagree(row, first, second) {
  const a = cell(first, row), b = cell(second, row);
  return a !== null && a !== undefined && b !== null && b !== undefined && a !== b;
}

function problemText(row) {
  const index = cell("problem", row);
  return index === undefined || index === null ? "" : DATA.rows.problems[index] || "";
}

function passes(row, query) {
  const correct = cell("correct", row);
  if (state.answer === "correct" && correct !== true) return false;
  if (state.answer === "wrong" && correct !== false) return false;
  if (state.answer === "unknown" && correct !== null && correct !== undefined) return false;
  if (!matchesValue(row)) return false;
  if (state.disagree && !disagree(row, state.compareA, state.compareB)) return false;
  if (REVIEW && state.reviewed !== "all") {
    const reviewed = cell("reviewed_at", row) !== null && cell("reviewed_at", row) !== undefined;
    if ((state.reviewed === "yes") !== reviewed) return false;
  }
  if (query) {
    const haystack = (problemText(row) + "\n" + (cell("problem_id", row) || "") + "\n" + (cell("response_id", row) || "")).toLowerCase();
    if (!haystack.includes(query)) return false;
  }
  return true;
}

// How much the label columns disagree: with --compare, 1 where that pair does; else how many
// different first errors the first-error columns give (2 or more: they disagree).
function disagreement(row) {
  if (DATA.compare.length) return disagree(row, DATA.compare[0], DATA.compare[1]) ? 1 : 0;
  const seen = new Set();
  for (const column of FIRST_ERRORS) {
    const value = cell(column, row);
    if (value !== null && value !== undefined) seen.add(value);
  }
  return seen.size;
}

// The distance of the response's step MC value nearest the threshold (rows with none go last).
function closeness(row) {
  const values = cell("step_mc", row);
  let best = Infinity;
  for (const value of values || []) {
    if (value !== null) best = Math.min(best, Math.abs(value - DATA.threshold));
  }
  return best;
}

function applyFilters() {
  const query = state.search.trim().toLowerCase();
  visible = [];
  for (let row = 0; row < ROWS; row++) if (passes(row, query)) visible.push(row);
  if (state.order === "disagreement") {
    const keys = new Map(visible.map((row) => [row, disagreement(row)]));
    visible.sort((a, b) => keys.get(b) - keys.get(a) || a - b);
  } else if (state.order === "threshold") {
    const keys = new Map(visible.map((row) => [row, closeness(row)]));
    visible.sort((a, b) => keys.get(a) - keys.get(b) || a - b);
  }
  state.page = 0;
  render();
}

// --- one response ------------------------------------------------------------------------

function markers(row) {
  const marks = new Map(); // step -> first-error columns that put their first error there
  for (const column of FIRST_ERRORS) {
    const value = cell(column, row);
    if (value !== null && value !== undefined && value >= 0) {
      if (!marks.has(value)) marks.set(value, []);
      marks.get(value).push(column);
    }
  }
  return marks;
}

function stepItem(row, step, text, marks) {
  const item = element("li", "step");
  item.dataset.step = step;
  const scale = DATA.color;
  const value = scale ? (cell(scale.column, row) || [])[step] : undefined;
  item.style.background = shade(value);
  item.appendChild(element("span", "index", String(step)));
  let shown = scale ? (scale.kind === "labels" ? { 1: "good", 0: "bad", true: "good", false: "bad" }[value] || "–" : formatNumber(value)) : "";
  const labels = cell("step_labels", row);
  if (labels && scale && scale.column !== "step_labels" && labels[step] !== undefined) {
    shown += labels[step] === 1 ? " +" : labels[step] === 0 ? " −" : "";
  }
  item.appendChild(element("span", "value", shown));
  item.appendChild(element("div", "text", text));
  const badges = element("span", "badges");
  for (const column of marks.get(step) || []) badges.appendChild(element("span", "chip " + column, column));
  item.appendChild(badges);
  if (marks.has(step)) {
    item.classList.add("marked");
    item.style.setProperty("--mark", `var(--${marks.get(step)[0]}, var(--other))`);
  }
  return item;
}

function stepList(row, from, to, marks) {
  const list = element("ol", "steps");
  const steps = cell("steps", row) || [];
  for (let step = from; step < to; step++) list.appendChild(stepItem(row, step, steps[step], marks));
  return list;
}

function metaLine(row) {
  const meta = element("div", "meta");
  const add = (label, value) => {
    if (value === undefined || value === null) return;
    const part = element("span");
    part.append(label + " ", element("b", "", formatNumber(value)));
    meta.appendChild(part);
  };
  add("response", cell("response_id", row));
  add("problem", cell("problem_id", row));
  const correct = cell("correct", row);
  if (correct !== undefined) {
    const kind = correct === true ? "correct" : correct === false ? "wrong" : "unknown";
    meta.appendChild(element("span", "verdict " + kind, kind === "unknown" ? "no verdict" : kind));
  }
  add("answer", cell("pred_answer", row));
  add("reference", cell("reference_answer", row));
  add("prm_score", cell("prm_score", row));
  for (const column of new Set([...DATA.value_columns, ...DATA.extra_columns])) add(column, cell(column, row));
  return meta;
}

function card(row) {
  const article = element("article", "response");
  article.dataset.row = row;
  if (cell("response_id", row) !== undefined) article.dataset.responseId = cell("response_id", row);
  article.appendChild(metaLine(row));
  const text = problemText(row);
  if (text) {
    const problem = element("div", "problem", text);
    problem.title = "click to show all of it";
    problem.addEventListener("click", () => problem.classList.toggle("open"));
    article.appendChild(problem);
  }
  const marks = element("div", "marks");
  for (const column of FIRST_ERRORS) {
    const value = cell(column, row);
    marks.appendChild(element("span", "chip " + column, `${column}: ${describeFirstError(value)}`));
  }
  if (FIRST_ERRORS.length) article.appendChild(marks);
  if (REVIEW) article.appendChild(reviewBar(row));

  const steps = cell("steps", row) || [];
  const stepMarks = markers(row);
  const thinking = Math.min(cell("thinking_steps", row) || 0, steps.length);
  if (thinking > 0) {
    // Folded, and only built when opened: a long trace's thinking may be hundreds of steps.
    const fold = element("details", "thinking");
    const inside = [...stepMarks.keys()].filter((step) => step < thinking);
    const summary = element("summary", "", `thinking: ${thinking} step${thinking === 1 ? "" : "s"}` +
      (inside.length ? ` (first error inside, at step ${Math.min(...inside)})` : ""));
    fold.appendChild(summary);
    fold.addEventListener("toggle", () => {
      if (fold.open && fold.children.length === 1) fold.appendChild(stepList(row, 0, thinking, stepMarks));
    });
    article.appendChild(fold);
  }
  article.appendChild(stepList(row, thinking, steps.length, stepMarks));
  return article;
}

// --- review ------------------------------------------------------------------------------

function reviewBar(row) {
  const bar = element("div", "review-bar");
  const reviewedAt = cell("reviewed_at", row);
  if (reviewedAt) {
    bar.appendChild(element("span", "done", `reviewed: ${describeFirstError(cell("human_first_error", row))}`));
    const note = cell("review_note", row);
    if (note) bar.appendChild(element("span", "", `“${note}”`));
    const undo = element("button", "undo", "undo");
    undo.type = "button";
    undo.addEventListener("click", (event) => { event.stopPropagation(); save(row, { clear: true }); });
    bar.appendChild(undo);
  } else {
    bar.appendChild(element("span", "", "click the first wrong step, or"));
  }
  const none = element("button", "no-error", "no error");
  none.type = "button";
  none.addEventListener("click", (event) => { event.stopPropagation(); openForm(row, -1); });
  bar.appendChild(none);
  return bar;
}

function openForm(row, step) {
  const article = document.querySelector(`article[data-row="${row}"]`);
  article.querySelectorAll(".review-form").forEach((form) => form.remove());
  const form = element("form", "review-form");
  form.appendChild(element("span", "", `human_first_error: ${describeFirstError(step)}`));
  const note = element("input");
  note.name = "note";
  note.placeholder = "note (optional)";
  note.value = cell("review_note", row) || "";
  const ok = element("button", "save", "save");
  ok.type = "submit";
  const cancel = element("button", "", "cancel");
  cancel.type = "button";
  cancel.addEventListener("click", () => form.remove());
  form.append(note, ok, cancel);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    save(row, { human_first_error: step, note: note.value });
  });
  article.querySelector(".review-bar").after(form);
  note.focus();
}

async function save(row, change) {
  const article = document.querySelector(`article[data-row="${row}"]`);
  try {
    const reply = await fetch(REVIEW.endpoint, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Prmtool-Token": REVIEW.token },
      body: JSON.stringify({ response_id: cell("response_id", row), ...change }),
    });
    const answer = await reply.json();
    if (!reply.ok) throw new Error(answer.error || reply.statusText);
    for (const [column, value] of Object.entries(answer.row)) {
      if (!COLUMNS[column]) COLUMNS[column] = new Array(ROWS).fill(null);
      COLUMNS[column][row] = value;
    }
    REVIEW.reviewed = answer.reviewed;
    article.replaceWith(card(row));
    progress();
  } catch (error) {
    const line = element("div", "error-line", "not saved: " + error.message);
    article.appendChild(line);
  }
}

function progress() {
  if (!REVIEW) return;
  document.getElementById("review-progress").textContent =
    `${REVIEW.reviewed.toLocaleString()} of ${ROWS.toLocaleString()} reviewed, saved to ${REVIEW.output}`;
}

// --- the list ----------------------------------------------------------------------------

function pager(node) {
  node.replaceChildren();
  const pages = Math.max(1, Math.ceil(visible.length / DATA.page_size));
  const previous = element("button", "previous", "‹ previous");
  previous.disabled = state.page === 0;
  previous.addEventListener("click", () => { state.page--; render(); window.scrollTo(0, 0); });
  const next = element("button", "next", "next ›");
  next.disabled = state.page >= pages - 1;
  next.addEventListener("click", () => { state.page++; render(); window.scrollTo(0, 0); });
  node.append(previous, element("span", "", `page ${state.page + 1} of ${pages}`), next);
}

function render() {
  const count = document.getElementById("count");
  count.dataset.count = visible.length;
  count.textContent = `${visible.length.toLocaleString()} of ${ROWS.toLocaleString()} responses`;
  const list = document.getElementById("list");
  const start = state.page * DATA.page_size;
  const shown = visible.slice(start, start + DATA.page_size);
  list.replaceChildren(...shown.map(card));
  if (!shown.length) list.appendChild(element("div", "empty", "no response passes these filters"));
  pager(document.getElementById("pager-top"));
  pager(document.getElementById("pager-bottom"));
}

// --- the summary tab ---------------------------------------------------------------------

function renderSummary() {
  const panel = document.getElementById("summary");
  const data = DATA.summary;
  if (!data) { panel.appendChild(element("p", "empty", "no summary")); return; }
  const table = element("table", "figures");
  for (const [key, value] of Object.entries(data.figures)) {
    const line = element("tr");
    const shown = value !== null && typeof value === "object"
      ? Object.entries(value).map(([k, v]) => `${k} ${formatNumber(v)}`).join(", ")
      : formatNumber(value);
    line.append(element("td", "", key.replaceAll("_", " ")), element("td", "", shown));
    table.appendChild(line);
  }
  panel.appendChild(table);
  const plots = element("div", "plots");
  for (const plot of data.plots) {
    const image = element("img");
    image.src = plot.src;
    image.alt = plot.name;
    plots.appendChild(image);
  }
  panel.appendChild(plots);
  for (const line of data.skipped) panel.appendChild(element("p", "empty", line));
}

// --- wiring ------------------------------------------------------------------------------

function setUp() {
  const byId = (id) => document.getElementById(id);
  const columnSelect = byId("filter-column");
  for (const column of [...FIRST_ERRORS, ...DATA.value_columns]) option(columnSelect, column, column);
  const valueSelect = byId("filter-value");
  valueSelect.hidden = true;
  columnSelect.addEventListener("change", () => {
    state.column = columnSelect.value;
    valueSelect.replaceChildren();
    valueSelect.hidden = !state.column;
    if (state.column) for (const [value, label] of valuesOf(state.column)) option(valueSelect, value, label);
    state.value = valueSelect.value;
    applyFilters();
  });
  valueSelect.addEventListener("change", () => { state.value = valueSelect.value; applyFilters(); });

  const [first, second] = DATA.compare.length ? DATA.compare : FIRST_ERRORS.slice(0, 2);
  for (const [id, chosen] of [["compare-a", first], ["compare-b", second]]) {
    const select = byId(id);
    for (const column of new Set([...FIRST_ERRORS, ...DATA.compare])) option(select, column, column);
    if (chosen) select.value = chosen;
    select.addEventListener("change", () => { state.compareA = byId("compare-a").value; state.compareB = byId("compare-b").value; applyFilters(); });
  }
  state.compareA = byId("compare-a").value;
  state.compareB = byId("compare-b").value;
  byId("compare").hidden = new Set([...FIRST_ERRORS, ...DATA.compare]).size < 2;
  byId("filter-disagree").addEventListener("change", (event) => { state.disagree = event.target.checked; applyFilters(); });
  byId("filter-answer").addEventListener("change", (event) => { state.answer = event.target.value; applyFilters(); });
  byId("order").value = state.order;
  byId("order").addEventListener("change", (event) => { state.order = event.target.value; applyFilters(); });
  let typing = null;
  byId("search").addEventListener("input", (event) => {
    clearTimeout(typing);
    typing = setTimeout(() => { state.search = event.target.value; applyFilters(); }, 150);
  });
  if (REVIEW) {
    byId("reviewed-filter").hidden = false;
    byId("filter-reviewed").addEventListener("change", (event) => { state.reviewed = event.target.value; applyFilters(); });
    document.body.classList.add("reviewing");
    byId("list").addEventListener("click", (event) => {
      const step = event.target.closest(".step");
      if (step) openForm(Number(step.closest("article").dataset.row), Number(step.dataset.step));
    });
    progress();
  }
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      for (const other of document.querySelectorAll(".tab")) other.classList.toggle("active", other === tab);
      byId("responses").hidden = tab.dataset.tab !== "responses";
      byId("summary").hidden = tab.dataset.tab !== "summary";
    });
  }
  legend();
  renderSummary();
  applyFilters();
  performance.mark("prmtool-rendered");
}

setUp();
