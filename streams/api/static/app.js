// The ledger's web page: reads the worker's HTTP API (same origin), follows an account's
// event stream, and submits commands. Money is integer minor units held as BigInt; no
// amount ever passes through a JavaScript number.
"use strict";

// ------------------------------------------------------------------ money

// Decimal places per currency: the same table as schemas/money.py (a test compares them).
const SCALES = {
  USD: 2, EUR: 2, GBP: 2, CHF: 2, CAD: 2, AUD: 2, SEK: 2, NOK: 2,
  DKK: 2, PLN: 2, CZK: 2, SGD: 2, HKD: 2, CNY: 2, INR: 2, BRL: 2,
  MXN: 2, ZAR: 2, JPY: 0, KRW: 0, ISK: 0, CLP: 0, VND: 0,
  KWD: 3, BHD: 3, JOD: 3, OMR: 3, TND: 3,
};
const MAX_AMOUNT_MINOR = 2n ** 53n; // the most one command may move

function scaleOf(currency) {
  if (!Object.hasOwn(SCALES, currency)) throw new Error(`unsupported currency ${currency}`);
  return SCALES[currency];
}

/** "12.34 USD" for (1234n, "USD"); a negative amount keeps its sign. */
function formatAmount(minor, currency) {
  const scale = scaleOf(currency);
  const value = BigInt(minor);
  const abs = value < 0n ? -value : value;
  const unit = 10n ** BigInt(scale);
  const whole = (abs / unit).toString();
  const frac = (abs % unit).toString().padStart(scale, "0");
  return `${value < 0n ? "-" : ""}${scale ? `${whole}.${frac}` : whole} ${currency}`;
}

/** Minor units (BigInt) from what a person typed, e.g. "12.3" USD -> 1230n.
 *  Throws an Error whose message says what is wrong, in words. */
function parseAmount(text, currency) {
  const scale = scaleOf(currency);
  let t = String(text).trim();
  if (t.toUpperCase().endsWith(currency)) t = t.slice(0, -currency.length).trim();
  if (t === "") throw new Error("enter an amount");
  const m = /^([0-9]*)(?:\.([0-9]*))?$/.exec(t);
  if (!m || (m[1] === "" && (m[2] ?? "") === "")) {
    throw new Error(`"${text}" is not an amount; write digits with an optional decimal ` +
                    `point, e.g. ${scale ? "12." + "34".padEnd(scale, "0").slice(0, scale) : "1234"}`);
  }
  const whole = m[1] || "0";
  const frac = m[2] ?? "";
  if (frac.length > scale) {
    throw new Error(scale === 0 ? `${currency} has no decimal places`
      : `${currency} has ${scale} decimal places; "${t}" has ${frac.length}`);
  }
  const minor = BigInt(whole) * 10n ** BigInt(scale) + BigInt(frac.padEnd(scale, "0") || "0");
  if (minor <= 0n) throw new Error("the amount must be more than zero");
  if (minor > MAX_AMOUNT_MINOR) {
    throw new Error(`the amount is too large: at most ${formatAmount(MAX_AMOUNT_MINOR, currency)}`);
  }
  return minor;
}

// ------------------------------------------------------------------ JSON without floats

/** JSON.parse, but every "*_minor" integer becomes a BigInt (exact beyond 2**53). */
function parseJson(text) {
  const quoted = text.replace(/("[A-Za-z_]*_minor"\s*:\s*)(-?[0-9]+)(?=\s*[,}\]])/g, '$1"$2"');
  return JSON.parse(quoted, (key, value) =>
    key.endsWith("_minor") && typeof value === "string" && /^-?[0-9]+$/.test(value)
      ? BigInt(value) : value);
}

/** JSON text in which BigInt values are written as plain integers. */
function toJson(doc) {
  const mark = "\u0000int:";
  return JSON.stringify(doc, (key, value) =>
    typeof value === "bigint" ? mark + value.toString() : value)
    .replace(/"\\u0000int:(-?[0-9]+)"/g, "$1");
}

// ------------------------------------------------------------------ words

const REASONS = {
  idempotency_key_reused: "this command id was already used for a different command",
  invalid_command: "the command is not valid",
  wrong_partition: "the command reached the wrong partition",
  invalid_amount: "the amount is not allowed",
  unsupported_currency: "the currency is not supported",
  invalid_overdraft_limit: "the overdraft limit is not allowed",
  invalid_expiry: "the expiry time is not allowed",
  transfer_to_self: "an account cannot transfer to itself",
  account_not_found: "there is no such account",
  account_already_exists: "an account with this id already exists",
  account_closed: "the account is closed",
  version_conflict: "the account changed in the meantime",
  currency_mismatch: "the currency is not the account's currency",
  hold_not_found: "there is no such hold",
  hold_already_exists: "a hold with this id already exists",
  hold_expired: "the hold has expired",
  hold_not_expired: "the hold has not expired yet",
  capture_exceeds_hold: "the capture is larger than the hold",
  insufficient_funds: "insufficient funds: the available balance is too low",
  balance_out_of_range: "the balance would be out of range",
  balance_not_zero: "the balance is not zero",
  holds_open: "the account still has open holds",
  transaction_not_found: "there is no such transaction or transfer",
  transaction_not_committed: "the transaction has not committed",
  already_reversed: "it is already reversed",
  transfer_refunded: "the transfer was refunded: it moved no money to reverse",
  transaction_not_pending: "the transaction is no longer pending",
  transaction_not_expired: "the transaction has not reached its deadline yet",
  transaction_timed_out: "not every account answered by the transaction's deadline",
};

function reasonWords(code) {
  const words = REASONS[code] ?? String(code).replaceAll("_", " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

/** "transaction t1", and its coordinator when that is another account (ids are scoped
 *  to their coordinator). */
function transactionName(p, e) {
  const other = p.coordinator_account_id && p.coordinator_account_id !== e.account_id;
  return `transaction ${p.transaction_id}${other ? ` (coordinator ${p.coordinator_account_id})` : ""}`;
}

/** "to merchant, fees" / "from payer": the other accounts of a posted transaction. */
function postingParties(p, account) {
  const to = new Set(), from = new Set();
  for (const q of p.postings ?? []) {
    if (q.from_account_id === account) to.add(q.to_account_id);
    if (q.to_account_id === account) from.add(q.from_account_id);
  }
  return [to.size ? `to ${[...to].join(", ")}` : "", from.size ? `from ${[...from].join(", ")}` : ""]
    .filter(Boolean).join(", ");
}

/** "order=o-1, channel=web": metadata in one line ("" for none). */
function metaText(metadata) {
  return Object.entries(metadata ?? {}).map(([k, v]) => `${k}=${v}`).join(", ");
}

const EVENT_WORDS = {
  AccountOpened: () => "Account opened",
  Deposited: () => "Deposit",
  Withdrawn: () => "Withdrawal",
  TransferDebited: (p) => `Transfer to ${p.to_account_id}`,
  TransferCredited: (p) => `Transfer from ${p.from_account_id}`,
  TransferReversed: (p) => `Transfer to ${p.to_account_id} reversed (${p.reason})`,
  HoldPlaced: (p) => `Hold ${p.hold_id} placed`,
  HoldCaptured: (p) => `Hold ${p.hold_id} captured`,
  HoldReleased: (p) => `Hold ${p.hold_id} ${p.reason}`,
  AccountClosed: () => "Account closed",
  TransactionStarted: (p) => p.reverses
    ? `Reversal ${p.transaction_id} of ${p.reverses} started`
    : `Transaction ${p.transaction_id} started: ${(p.postings ?? []).length} postings`,
  TransactionReserved: (p, e) => `Reserved for ${transactionName(p, e)}`,
  TransactionPosted: (p, e) =>
    `Posted ${transactionName(p, e)}: ${postingParties(p, e.account_id)}`,
  TransactionReleased: (p, e) =>
    `Released ${transactionName(p, e)} (${String(p.reason).replaceAll("_", " ")})`,
  TransactionCommitted: (p) => `Transaction ${p.transaction_id} committed`,
  TransactionRejected: (p) => `Transaction ${p.transaction_id} rejected: ` +
    `${reasonWords(p.reason)}${p.posting_index >= 0 ? ` (posting ${p.posting_index + 1})` : ""}`,
  AccountMetadataSet: (p) => `Metadata set: ${metaText(p.metadata) || "none"}`,
};

function eventWords(e) {
  const f = EVENT_WORDS[e.type];
  return f ? f(e.payload ?? {}, e) : e.type;
}

function eventAmount(e) {
  const amount = e.amount_minor ?? e.payload?.captured_minor;
  return amount === undefined || amount === null ? "" : formatAmount(amount, e.currency);
}

const pad = (n, w = 2) => String(n).padStart(w, "0");

/** An instant (epoch ms) as local "YYYY-MM-DD HH:MM:SS.mmm" (sep "T" for inputs). */
function localTime(ms, sep = " ") {
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}${sep}` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.` +
    `${pad(d.getMilliseconds(), 3)}`;
}

// ------------------------------------------------------------------ HTTP

async function request(method, path, body) {
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers: body === undefined ? {} : { "Content-Type": "application/json" },
      body,
    });
  } catch {
    return { status: 0, doc: { error: "unreachable",
      detail: "the worker did not answer; check that it is running" } };
  }
  const text = await resp.text();
  try {
    return { status: resp.status, doc: parseJson(text) };
  } catch {
    return { status: resp.status, doc: { error: "unreadable",
      detail: `the worker answered ${resp.status} with something that is not JSON` } };
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** GET, asking again (a bounded number of times) while the worker answers 503. */
async function get(path, tries = 20) {
  for (let i = 1; ; i++) {
    const answer = await request("GET", path);
    if (answer.status !== 503 || i >= tries) return answer;
    await sleep(500);
  }
}

const enc = encodeURIComponent;

// ------------------------------------------------------------------ page state

const HISTORY_CAP = 5000; // events kept in the page (the newest ones)
const PAGE_ROWS = 20;

const state = {
  gen: 0, // bumped on each account change: answers for an older one are dropped
  id: null,
  account: null, // GET /accounts/{id} now
  events: [], // ascending by version, each version once
  asOf: null, // null: now (live); else epoch ms
  asOfDoc: null, // GET /accounts/{id}?as_of=...; null if the account did not exist yet
  page: 0, // 0 = newest rows
  source: null, // EventSource
  refreshing: false,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function lastVersion() {
  return state.events.length ? state.events[state.events.length - 1].version : 0;
}

function addEvents(events) {
  let added = 0;
  for (const e of events) {
    if (e.version > lastVersion()) {
      state.events.push(e);
      added++;
    } else if (!state.events.some((x) => x.version === e.version)) {
      state.events.push(e);
      state.events.sort((a, b) => a.version - b.version);
      added++;
    }
  }
  if (state.events.length > HISTORY_CAP) state.events.splice(0, state.events.length - HISTORY_CAP);
  return added;
}

// ------------------------------------------------------------------ loading

/** Show an account; ``justOpened``: it was opened a moment ago, and reads lag the
 *  ledger's outcome by a few milliseconds, so a "no such account" is asked again. */
async function showAccount(id, justOpened = false) {
  const gen = ++state.gen;
  closeStream();
  Object.assign(state, { id, account: null, events: [], asOf: null, asOfDoc: null, page: 0 });
  $("statement").hidden = $("statement-csv").hidden = true;
  $("statement-summary").textContent = "";
  $("find-status").textContent = `Looking up account “${id}”…`;
  let answer = await get(`/accounts/${enc(id)}`);
  for (let i = 0; justOpened && answer.status === 404 && i < 25 && gen === state.gen; i++) {
    await sleep(200);
    answer = await get(`/accounts/${enc(id)}`);
  }
  if (gen !== state.gen) return;
  if (answer.status !== 200) {
    $("account").hidden = true;
    $("find-status").textContent = answer.status === 404
      ? `No account has the id “${id}”.`
      : `Could not read the account: ${answer.doc.detail}.`;
    return;
  }
  state.account = answer.doc;
  history.replaceState(null, "", `#${enc(id)}`);
  if (!$("cmd-account").value) $("cmd-account").value = id;
  syncCurrency();
  const loaded = await loadEvents(gen, Math.max(1, answer.doc.version - HISTORY_CAP + 1));
  if (gen !== state.gen) return;
  $("find-status").textContent = loaded
    ? `Showing account “${id}”.`
    : `Showing account “${id}”; its history could not be read yet.`;
  render();
  openStream(gen);
  if (lastVersion() > state.account.version) refreshAccount(gen); // it changed meanwhile
}

async function loadEvents(gen, from) {
  let next = from;
  while (next !== null && state.events.length < HISTORY_CAP) {
    const answer = await get(`/accounts/${enc(state.id)}/events?from_version=${next}&limit=1000`);
    if (gen !== state.gen) return false;
    if (answer.status !== 200) return false;
    addEvents(answer.doc.events);
    next = answer.doc.next_from_version;
  }
  return true;
}

/** The account now, again, until it shows at least the newest event's version. */
async function refreshAccount(gen) {
  if (state.refreshing) return;
  state.refreshing = true;
  try {
    for (let i = 0; i < 20 && gen === state.gen; i++) {
      const answer = await get(`/accounts/${enc(state.id)}`, 3);
      if (gen !== state.gen || answer.status !== 200) return;
      state.account = answer.doc;
      if (answer.doc.version >= lastVersion()) break;
      await sleep(150);
    }
    if (gen === state.gen) render();
  } finally {
    state.refreshing = false;
  }
}

function openStream(gen) {
  if (gen !== state.gen) return;
  const source = new EventSource(
    `/accounts/${enc(state.id)}/stream?from_version=${lastVersion() + 1}`);
  state.source = source;
  source.addEventListener("open", () => {
    if (gen === state.gen) $("live").textContent = "Live: new events appear as they happen.";
  });
  source.addEventListener("ledger-event", (msg) => {
    if (gen !== state.gen) return;
    const e = parseJson(msg.data);
    if (!addEvents([e])) return;
    $("history-news").textContent = `New: version ${e.version}, ${eventWords(e)}` +
      `${eventAmount(e) ? " " + eventAmount(e) : ""}; balance ` +
      `${formatAmount(e.balance_after_minor, e.currency)}.`;
    if (state.account && e.version > state.account.version) {
      // Show the event's balance at once; holds and status come with the next read.
      Object.assign(state.account, {
        version: e.version,
        balance: formatAmount(e.balance_after_minor, e.currency),
        available: formatAmount(e.available_after_minor, e.currency),
      });
    }
    render(e.version);
    refreshAccount(gen);
  });
  source.addEventListener("error", () => {
    if (gen !== state.gen) return;
    if (source.readyState === EventSource.CLOSED) {
      // Refused (e.g. 503 while the worker catches up): open a new one shortly.
      $("live").textContent = "Live updates paused; reconnecting…";
      state.source = null;
      setTimeout(() => openStream(gen), 3000);
    } else {
      $("live").textContent = "Live updates paused; reconnecting…";
    }
  });
}

function closeStream() {
  if (state.source) state.source.close();
  state.source = null;
}

// ------------------------------------------------------------------ time travel

/** The distinct instants at which the account changed, ascending. */
function instants() {
  const out = [];
  for (const e of state.events) {
    if (out[out.length - 1] !== e.occurred_at) out.push(e.occurred_at);
  }
  return out;
}

async function travelTo(ms) {
  const gen = state.gen;
  state.asOf = ms;
  state.page = 0;
  const answer = await get(`/accounts/${enc(state.id)}?as_of=${ms}`);
  if (gen !== state.gen || state.asOf !== ms) return;
  if (answer.status === 200) state.asOfDoc = answer.doc;
  else if (answer.status === 404) state.asOfDoc = null;
  else {
    $("acc-when").textContent = `Could not read the past state: ${answer.doc.detail}.`;
    return;
  }
  render();
}

function backToNow() {
  state.asOf = null;
  state.asOfDoc = null;
  state.page = 0;
  $("time-input").value = "";
  render();
}

let sliderTimer = null;

function onSlider() {
  const points = instants();
  const i = Number($("time-slider").value);
  clearTimeout(sliderTimer);
  if (i >= points.length) {
    backToNow();
    return;
  }
  $("time-label").textContent = localTime(points[i]);
  sliderTimer = setTimeout(() => travelTo(points[i]), 120);
}

function onTimeInput() {
  const value = $("time-input").value;
  if (!value) return;
  const ms = new Date(value).getTime(); // a local date-time, as the input shows it
  if (Number.isNaN(ms)) return;
  travelTo(ms);
}

// ------------------------------------------------------------------ drawing

function render(newVersion) {
  if (!state.account) return;
  $("account").hidden = false;
  const a = state.account;
  const past = state.asOf !== null;
  const shown = past ? state.asOfDoc : a;
  $("acc-id").textContent = `“${a.account_id}”`;
  $("account").classList.toggle("past", past);
  if (past) {
    $("acc-when").textContent = shown
      ? `As of ${localTime(state.asOf)} (version ${shown.version}). ` +
        "Use “Back to now” for the present."
      : `As of ${localTime(state.asOf)} the account did not exist yet.`;
  } else {
    $("acc-when").textContent = "Now.";
  }
  $("acc-balance").textContent = shown ? shown.balance : "–";
  $("acc-available").textContent = shown ? shown.available : "–";
  $("acc-currency").textContent = a.currency;
  $("acc-status").textContent = shown ? shown.status : "not yet opened";
  $("acc-version").textContent = shown ? String(shown.version) : "0";
  renderMetadata(past);
  renderHolds(past);
  renderSlider(past);
  renderHistory(past ? (shown ? shown.version : 0) : Infinity, newVersion);
  renderChart();
}

/** The account's metadata now (GET /accounts/{id}? as_of has none). */
function renderMetadata(past) {
  const entries = past ? [] : Object.entries(state.account.metadata ?? {});
  $("acc-metadata-box").hidden = entries.length === 0;
  $("acc-metadata").replaceChildren(...entries.map(([k, v]) => {
    const row = el("div");
    row.append(el("dt", {}, k), el("dd", {}, v));
    return row;
  }));
}

function renderHolds(past) {
  const table = $("holds");
  const body = table.tBodies[0];
  body.replaceChildren();
  // A pending transaction's reservation is a hold until the transaction ends.
  const holds = Object.entries(state.account.holds ?? {})
    .map(([id, h]) => [id, h.amount_minor, localTime(h.expires_at)])
    .concat((state.account.reservations ?? []).map((r) => [
      `transaction ${r.transaction_id} (coordinator ${r.coordinator_account_id})`,
      r.amount_minor, "when the transaction ends"]));
  if (past) {
    table.hidden = true;
    $("holds-none").textContent = "Holds are shown for the present only.";
    return;
  }
  table.hidden = holds.length === 0;
  $("holds-none").textContent = holds.length ? "" : "No open holds.";
  for (const [id, amount, expires] of holds) {
    const row = body.insertRow();
    row.append(el("td", { class: "id" }, id),
      el("td", { class: "num" }, formatAmount(amount, state.account.currency)),
      el("td", {}, expires));
  }
}

function renderSlider(past) {
  const slider = $("time-slider");
  const points = instants();
  slider.max = String(points.length);
  if (!past) {
    slider.value = String(points.length);
    $("time-label").textContent = "now";
  } else {
    let i = points.length - 1;
    while (i > 0 && points[i] > state.asOf) i--;
    if (points.length && points[0] > state.asOf) i = 0;
    slider.value = String(Math.max(0, i));
    $("time-label").textContent = localTime(state.asOf);
  }
  slider.setAttribute("aria-valuetext", past ? `as of ${localTime(state.asOf)}` : "now");
}

const COLUMNS = ["Version", "Event", "Amount", "Balance after", "Available after", "Actor",
  "Time", "Command id", "Correlation id"];

function renderHistory(maxVersion, newVersion) {
  const rows = state.events.filter((e) => e.version <= maxVersion).reverse();
  const pages = Math.max(1, Math.ceil(rows.length / PAGE_ROWS));
  state.page = Math.min(state.page, pages - 1);
  const start = state.page * PAGE_ROWS;
  const body = $("history").tBodies[0];
  body.replaceChildren();
  for (const e of rows.slice(start, start + PAGE_ROWS)) {
    const tr = body.insertRow();
    tr.dataset.version = String(e.version);
    if (e.version === newVersion) tr.className = "new";
    const cells = [
      [String(e.version), "num"], [eventWords(e), ""], [eventAmount(e), "num"],
      [formatAmount(e.balance_after_minor, e.currency), "num"],
      [formatAmount(e.available_after_minor, e.currency), "num"], [e.actor, ""],
      [localTime(e.occurred_at), ""], [e.command_id, "id"], [e.correlation_id ?? "", "id"],
    ];
    cells.forEach(([text, cls], i) => {
      const td = el("td", { "data-label": COLUMNS[i] }, text);
      if (cls) td.className = cls;
      if (i === 1 && metaText(e.metadata)) {
        td.append(el("span", { class: "meta" }, metaText(e.metadata)));
      }
      if (i === 6) {
        td.replaceChildren(el("time", { datetime: new Date(e.occurred_at).toISOString() }, text));
      }
      tr.append(td);
    });
  }
  $("page-info").textContent = rows.length
    ? `Events ${start + 1}–${Math.min(start + PAGE_ROWS, rows.length)} of ${rows.length}, newest first`
    : "No events.";
  $("page-newer").disabled = state.page === 0;
  $("page-older").disabled = state.page >= pages - 1;
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A step line of the balance after each event, in inline SVG. Amounts are scaled to
 *  pixels with BigInt arithmetic; only the small pixel numbers become numbers. */
function renderChart() {
  const box = $("chart");
  const events = state.events;
  const cur = state.account.currency;
  box.replaceChildren();
  if (!events.length) {
    $("chart-caption").textContent = "No events yet.";
    return;
  }
  // Drawn at the box's own width, so the labels keep their size on a phone.
  const W = Math.min(1200, Math.max(280, Math.round(box.clientWidth) || 800));
  const H = W < 500 ? 150 : 200, L = 8, R = 8, T = 22, B = 22;
  const t0 = events[0].occurred_at;
  const tEnd = Math.max(events[events.length - 1].occurred_at, state.asOf ?? 0);
  const span = Math.max(1, tEnd - t0);
  let lo = 0n, hi = 0n;
  for (const e of events) {
    if (e.balance_after_minor < lo) lo = e.balance_after_minor;
    if (e.balance_after_minor > hi) hi = e.balance_after_minor;
  }
  const range = hi - lo > 0n ? hi - lo : 1n;
  const plotH = BigInt(H - T - B);
  const x = (t) => L + Math.round(((t - t0) * (W - L - R)) / span);
  const y = (minor) => T + Number(plotH - ((minor - lo) * plotH) / range);
  let d = "";
  let prevY = null;
  for (const e of events) {
    const px = x(e.occurred_at), py = y(e.balance_after_minor);
    d += prevY === null ? `M${px},${py}` : `H${px}V${py}`;
    prevY = py;
  }
  d += `H${W - R}`;
  const first = events[0], last = events[events.length - 1];
  const label = `Balance from ${localTime(first.occurred_at)} to ${localTime(last.occurred_at)}: ` +
    `lowest ${formatAmount(lo, cur)}, highest ${formatAmount(hi, cur)}, ` +
    `now ${formatAmount(last.balance_after_minor, cur)}.`;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label });
  chart.append(svg("title", {}, label));
  if (lo < 0n && hi > 0n) {
    chart.append(svg("line", { class: "zero", x1: L, x2: W - R, y1: y(0n), y2: y(0n) }));
  }
  chart.append(svg("path", { class: "line", d }));
  if (state.asOf !== null) {
    const mx = x(Math.max(t0, state.asOf));
    chart.append(svg("line", { class: "marker", x1: mx, x2: mx, y1: T - 6, y2: H - B + 6 }));
  }
  chart.append(svg("text", { x: L, y: 14 }, `highest ${formatAmount(hi, cur)}`),
    svg("text", { x: L, y: H - 6 }, `lowest ${formatAmount(lo, cur)}`),
    svg("text", { x: W - R, y: H - 6, "text-anchor": "end" }, localTime(last.occurred_at)));
  box.append(chart);
  $("chart-caption").textContent = label;
}

// ------------------------------------------------------------------ commands

let retry = null; // {key, commandId}: the same command again reuses its id (idempotent)

function commandKind() {
  return $("cmd-type").value;
}

function syncForm() {
  const kind = commandKind();
  $("row-to").hidden = kind !== "Transfer";
  $("row-amount").hidden = kind === "OpenAccount" || kind === "SetAccountMetadata";
  $("row-currency").hidden = kind === "SetAccountMetadata";
  $("cmd-account-label").textContent =
    kind === "Transfer" ? "From account id" : kind === "OpenAccount" ? "New account id" : "Account id";
}

function syncCurrency() {
  if (state.account && $("cmd-account").value.trim() === state.account.account_id) {
    $("cmd-currency").value = state.account.currency;
  }
}

function fieldError(input, message) {
  input.setAttribute("aria-invalid", "true");
  input.focus();
  showOutcome("refused", [message]);
  return null;
}

function buildCommand() {
  for (const id of ["cmd-account", "cmd-to", "cmd-amount", "cmd-actor", "cmd-meta"]) {
    $(id).removeAttribute("aria-invalid");
  }
  const kind = commandKind();
  const currency = $("cmd-currency").value;
  const account = $("cmd-account").value.trim();
  const actor = $("cmd-actor").value.trim();
  if (!account) return fieldError($("cmd-account"), "Enter the account id.");
  if (!actor) return fieldError($("cmd-actor"), "Enter your name (the actor).");
  const metadata = {};
  for (const line of $("cmd-meta").value.split("\n").filter((l) => l.trim())) {
    const at = line.indexOf("=");
    const key = line.slice(0, Math.max(at, 0)).trim();
    if (!key) return fieldError($("cmd-meta"), `Metadata: write KEY=VALUE, not “${line}”.`);
    metadata[key] = line.slice(at + 1).trim();
  }
  if (kind === "SetAccountMetadata") return { type: kind, account_id: account, actor, metadata };
  const cmd = { type: kind, account_id: account, actor, currency };
  if (Object.keys(metadata).length) cmd.metadata = metadata;
  if (kind === "Transfer") {
    const to = $("cmd-to").value.trim();
    if (!to) return fieldError($("cmd-to"), "Enter the account to transfer to.");
    cmd.to_account_id = to;
  }
  if (kind !== "OpenAccount") {
    try {
      cmd.amount_minor = parseAmount($("cmd-amount").value, currency);
    } catch (err) {
      return fieldError($("cmd-amount"), `The amount: ${err.message}.`);
    }
  }
  return cmd;
}

function newId() {
  if (crypto.randomUUID) return `web-${crypto.randomUUID()}`;
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `web-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function showOutcome(kind, lines, detail) {
  const box = $("outcome");
  box.className = `outcome ${kind}`;
  box.replaceChildren(...lines.map((line) => el("p", {}, line)));
  if (detail) box.append(el("p", { class: "detail" }, `Details from the ledger: ${detail}`));
}

function acceptedWords(cmd, events) {
  const e = events[0];
  const amount = cmd.amount_minor !== undefined ? formatAmount(cmd.amount_minor, cmd.currency) : "";
  const balance = e ? formatAmount(e.balance_after_minor, e.currency) : "";
  switch (cmd.type) {
    case "OpenAccount":
      return `Opened account “${cmd.account_id}” in ${cmd.currency}.`;
    case "Deposit":
      return `Deposited ${amount} into “${cmd.account_id}”. Its balance is now ${balance}.`;
    case "Withdraw":
      return `Withdrew ${amount} from “${cmd.account_id}”. Its balance is now ${balance}.`;
    case "SetAccountMetadata":
      return `Set the metadata of “${cmd.account_id}”: ${metaText(cmd.metadata) || "none"}.`;
    case "Transfer":
      return `Sent ${amount} from “${cmd.account_id}” to “${cmd.to_account_id}”. ` +
        `“${cmd.account_id}” now has ${balance}; “${cmd.to_account_id}” is credited next ` +
        "(or the money comes back if it cannot be).";
    default:
      return "Done.";
  }
}

async function submitCommand(event) {
  event.preventDefault();
  const cmd = buildCommand();
  if (!cmd) return;
  const key = toJson(cmd);
  const commandId = retry && retry.key === key ? retry.commandId : newId();
  retry = { key, commandId };
  const body = toJson({ ...cmd, command_id: commandId, issued_at: Date.now() });
  const button = $("cmd-submit");
  button.disabled = true;
  showOutcome("", ["Sending…"]);
  try {
    const { status, doc } = await request("POST", "/commands?wait=true", body);
    if (status === 200 && doc.accepted) {
      retry = null;
      showOutcome("ok", [acceptedWords(cmd, doc.events)]);
      if (cmd.type === "OpenAccount") {
        $("find-id").value = cmd.account_id;
        showAccount(cmd.account_id, true);
      }
    } else if (status === 202) {
      showOutcome("", ["The ledger has the command but no outcome yet. Submit the same " +
        "command again to learn it; it will not be applied twice."]);
    } else if (doc.accepted === false) {
      retry = null;
      showOutcome("refused", [`Refused: ${reasonWords(doc.reason)}.`], doc.detail);
    } else if (doc.error === "invalid_command") {
      retry = null;
      const what = (doc.errors ?? []).map((e) => `${(e.loc ?? []).join(".") || "command"}: ${e.msg}`);
      showOutcome("refused", ["The command is not valid.", ...what]);
    } else {
      showOutcome("refused", [`Not done: ${doc.detail ?? "the worker could not take it"}.`,
        "Submit again to retry; it will not be applied twice."]);
    }
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------ wiring

// ------------------------------------------------------------------ statement

/** The chosen month's statement (UTC months), with a link to the same as CSV. */
async function showStatement(event) {
  event.preventDefault();
  const gen = state.gen;
  const id = state.id;
  const month = $("statement-month").value; // "YYYY-MM"
  if (!id || !/^[0-9]{4}-[0-9]{2}$/.test(month)) return;
  const [y, m] = month.split("-").map(Number);
  const path = `/accounts/${enc(id)}/statement?from=${Date.UTC(y, m - 1, 1)}` +
    `&to=${Date.UTC(y, m, 1)}`;
  $("statement-summary").textContent = `Reading the statement of ${month}…`;
  const answer = await get(path);
  if (gen !== state.gen) return;
  const table = $("statement");
  const link = $("statement-csv");
  if (answer.status !== 200) {
    table.hidden = link.hidden = true;
    $("statement-summary").textContent = `Could not read the statement: ${answer.doc.detail}.`;
    return;
  }
  const doc = answer.doc;
  const body = table.querySelector("tbody");
  body.replaceChildren(...doc.entries.map((e) => {
    const tr = el("tr", { "data-version": String(e.version) });
    for (const text of [localTime(Number(e.occurred_at)), e.description,
      e.counterparty || "", e.transfer_id || e.transaction_id || "", e.amount,
      e.balance_after]) {
      tr.append(el("td", {}, text));
    }
    return tr;
  }));
  table.hidden = doc.entries.length === 0;
  const n = doc.entries.length;
  $("statement-summary").textContent = `${month}: opening balance ` +
    `${doc.opening_balance || "none (no account yet)"}, ${n} ${n === 1 ? "entry" : "entries"}, ` +
    `closing balance ${doc.closing_balance || "none"}.`;
  link.href = `${path}&format=csv`;
  link.download = `statement-${id}-${month}.csv`;
  link.hidden = false;
}

function start() {
  const select = $("cmd-currency");
  for (const code of Object.keys(SCALES).sort()) select.append(el("option", { value: code }, code));
  select.value = "USD";
  $("find-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("find-id").value.trim();
    if (id) {
      $("cmd-account").value = id;
      showAccount(id);
    }
  });
  $("cmd-form").addEventListener("submit", submitCommand);
  $("statement-form").addEventListener("submit", showStatement);
  const now = new Date();
  $("statement-month").value = `${now.getUTCFullYear()}-${pad(now.getUTCMonth() + 1)}`;
  $("cmd-type").addEventListener("change", syncForm);
  $("cmd-account").addEventListener("change", syncCurrency);
  $("time-slider").addEventListener("input", onSlider);
  $("time-input").addEventListener("change", onTimeInput);
  $("time-now").addEventListener("click", backToNow);
  $("page-newer").addEventListener("click", () => { state.page--; render(); });
  $("page-older").addEventListener("click", () => { state.page++; render(); });
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => state.account && renderChart(), 150);
  });
  syncForm();
  const fromHash = decodeURIComponent(location.hash.slice(1));
  if (fromHash) {
    $("find-id").value = fromHash;
    $("cmd-account").value = fromHash;
    showAccount(fromHash);
  }
}

window.ledgerMoney = { SCALES, formatAmount, parseAmount, parseJson, toJson };
document.addEventListener("DOMContentLoaded", start);
