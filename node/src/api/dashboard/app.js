// The tern dashboard: polls the daemon's control API and streams chat
// from its OpenAI endpoint. Text from peers and models goes into the page
// as text nodes only (never as markup), and the page runs under a content
// security policy that forbids inline script.
'use strict';

const TOKEN_KEY = 'tern.token';
const POLL_MS = 1000;
const MODELS_EVERY = 5;

// `tern dashboard` prints the address with the key in the fragment, which
// the browser never sends to a server: keep it for this tab and drop it
// from the address bar (and from history).
(function takeToken() {
  const m = /(?:^|[#&])token=([0-9a-f]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, m[1]);
    history.replaceState(null, '', location.pathname);
  }
})();

const $ = (id) => document.getElementById(id);

/** An element with attributes and children (strings become text nodes). */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'title') e.title = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const SVG = 'http://www.w3.org/2000/svg';
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function short(id) {
  return id ? String(id).slice(0, 12) : '';
}

function bytes(n) {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function num(x, digits = 3) {
  return x === null || x === undefined ? '' : Number(x).toFixed(digits);
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 120 ? `${s} s` : `${Math.round(s / 60)} min`;
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

class ApiError extends Error {}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    throw new ApiError('No key: open the address `tern dashboard` prints (it carries the key).');
  }
  const headers = Object.assign({ Authorization: `Bearer ${token}` }, options.headers || {});
  const r = await fetch(path, Object.assign({}, options, { headers }));
  if (!r.ok) {
    let why = `${r.status} ${r.statusText}`;
    try {
      const body = await r.json();
      const e = body.error;
      why = typeof e === 'string' ? e : (e && e.message) || why;
    } catch (_) { /* not JSON */ }
    if (r.status === 401) why = `${why}. The daemon restarted? Open the new address \`tern dashboard\` prints.`;
    throw new ApiError(why);
  }
  return r;
}

async function json(path) {
  return (await api(path)).json();
}

// ---------------------------------------------------------------- state

let selectedJob = null;
let polls = 0;
let polling = false;

function showError(e) {
  const box = $('error');
  if (e) {
    box.textContent = e.message || String(e);
    box.hidden = false;
  } else {
    box.hidden = true;
  }
}

// ---------------------------------------------------------------- views

function renderNode(n) {
  const paused = n.paused ? ` · paused: ${n.paused}` : '';
  $('node').replaceChildren(
    el('code', { title: n.public_key }, short(n.peer_id.replace(/^12D3KooW/, ''))),
    ` · v${n.version} · ${n.compute} · ${n.power}${paused} · NAT ${n.nat} · ` +
      `${n.connected_peers} connected (${n.relayed_connections} relayed) · ` +
      `in ${bytes(n.bytes_in)}, out ${bytes(n.bytes_out)}`,
  );
}

function renderPeers(peers) {
  $('peer-count').textContent = `${peers.length} peer${peers.length === 1 ? '' : 's'}`;
  $('no-peers').hidden = peers.length > 0;
  replaceRows(
    $('peers').tBodies[0],
    peers.map((p) =>
      el(
        'tr',
        { class: 'peer', 'data-key': p.public_key },
        el('td', {}, el('code', { title: p.public_key }, short(p.public_key)), el('div', { class: 'muted' }, `v${p.version}`)),
        el('td', {}, p.hardware),
        el('td', {}, p.runs_on),
        el(
          'td',
          {},
          p.macs_per_second ? `${(p.macs_per_second / 1e9).toFixed(1)} GMAC/s ` : 'none ',
          p.macs_per_second
            ? el('span', { class: p.score_verified ? 'good' : 'muted' }, p.score_verified ? '✓ verified' : 'unverified')
            : null,
        ),
        el('td', { class: p.paused ? 'bad' : '' }, p.power),
        el('td', {}, `${p.active_tasks} / ${p.max_tasks}`),
        el('td', { title: p.addr || '' }, p.link),
      ),
    ),
  );
}

function renderTasks(tasks) {
  $('no-tasks').hidden = tasks.length > 0;
  replaceRows(
    $('tasks').tBodies[0],
    tasks.map((t) =>
      el(
        'tr',
        { class: 'task' },
        el('td', {}, el('code', { title: t.task }, short(t.task))),
        el('td', {}, t.kind),
        el('td', {}, el('code', { title: t.client }, short(t.client))),
        el('td', {}, el('code', { title: t.model }, short(t.model))),
        el('td', {}, ago(t.since_ms)),
      ),
    ),
  );
}

function jobStatus(s) {
  if (!s) return '';
  switch (s.run) {
    case 'retrying':
      return `retrying (attempt ${s.attempt}): ${s.error}`;
    case 'failed':
      return `failed: ${s.error}`;
    default:
      return s.run;
  }
}

function renderJobs(jobs) {
  $('no-jobs').hidden = jobs.length > 0;
  if (!selectedJob && jobs.length) {
    const running = jobs.find((j) => j.status.run === 'running');
    selectedJob = (running || jobs[0]).job;
  }
  replaceRows(
    $('jobs').tBodies[0],
    jobs.map((j) => {
      const tr = el(
        'tr',
        { class: `job selectable${j.job === selectedJob ? ' selected' : ''}`, 'data-job': j.job },
        el('td', {}, el('code', { title: j.job }, short(j.job))),
        el('td', {}, jobStatus(j.status)),
        el('td', {}, j.rounds ? `${j.round} / ${j.rounds}` : ''),
        el('td', {}, j.shards ? `${j.accepted} / ${j.shards}` : ''),
        el('td', {}, num(j.last_loss)),
        el('td', {}, num(j.last_eval_loss)),
        el('td', { class: j.verdicts ? 'bad' : '' }, j.verdicts),
      );
      tr.addEventListener('click', () => {
        selectedJob = j.job;
        refresh();
      });
      return tr;
    }),
  );
}

/** Training and held-out loss per round as lines on an SVG. */
function renderPlot(state) {
  const plot = $('loss-plot');
  const W = 520, H = 220, L = 44, R = 10, T = 10, B = 26;
  const rounds = state.rounds || [];
  const train = rounds.map((r) => [r.round + 1, r.loss]);
  const evals = [];
  if (state.eval_loss_start !== null && state.eval_loss_start !== undefined) evals.push([0, state.eval_loss_start]);
  for (const r of rounds) if (r.eval_loss !== null && r.eval_loss !== undefined) evals.push([r.round + 1, r.eval_loss]);
  const all = train.concat(evals).map((p) => p[1]).filter(Number.isFinite);
  plot.replaceChildren();
  plot.setAttribute('data-points', String(rounds.length));
  const xmax = Math.max(state.spec ? state.spec.rounds : 1, 1);
  let lo = all.length ? Math.min(...all) : 0;
  let hi = all.length ? Math.max(...all) : 1;
  if (hi - lo < 1e-9) {
    lo -= 0.5;
    hi += 0.5;
  }
  const pad = (hi - lo) * 0.08;
  lo -= pad;
  hi += pad;
  const x = (v) => L + ((W - L - R) * v) / xmax;
  const y = (v) => T + ((H - T - B) * (hi - v)) / (hi - lo);
  plot.append(svg('line', { class: 'axis', x1: L, y1: H - B, x2: W - R, y2: H - B }));
  plot.append(svg('line', { class: 'axis', x1: L, y1: T, x2: L, y2: H - B }));
  for (const v of [lo + pad, (lo + hi) / 2, hi - pad]) {
    const t = svg('text', { x: 4, y: y(v) + 3 });
    t.textContent = v.toFixed(2);
    plot.append(t);
  }
  const step = Math.max(1, Math.ceil(xmax / 10));
  for (let r = 0; r <= xmax; r += step) {
    const t = svg('text', { x: x(r) - 3, y: H - 8 });
    t.textContent = String(r);
    plot.append(t);
  }
  const xl = svg('text', { x: W - R - 40, y: H - 8 });
  xl.textContent = 'round';
  plot.append(xl);
  for (const [points, cls] of [[train, 'train'], [evals, 'eval']]) {
    const ok = points.filter((p) => Number.isFinite(p[1]));
    if (ok.length > 1) {
      plot.append(svg('polyline', { class: cls, points: ok.map((p) => `${x(p[0])},${y(p[1])}`).join(' ') }));
    }
    for (const p of ok) {
      const c = svg('circle', { class: `${cls} point`, cx: x(p[0]), cy: y(p[1]), r: 3 });
      const tip = svg('title');
      tip.textContent = `round ${p[0]}: ${p[1].toFixed(4)}`;
      c.append(tip);
      plot.append(c);
    }
  }
}

function renderJob(detail) {
  const box = $('job');
  const state = detail && detail.state;
  if (!state) {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  $('job-id').textContent = state.id;
  const total = state.spec.rounds * state.spec.shards.length;
  const done = state.round * state.spec.shards.length + Object.keys(state.accepted || {}).length;
  $('job-bar').style.width = `${total ? Math.min(100, (100 * done) / total) : 0}%`;
  const last = state.rounds.length ? state.rounds[state.rounds.length - 1] : null;
  $('job-summary').textContent =
    `${jobStatus(detail.status)} · round ${state.round} of ${state.spec.rounds} · ` +
    `${state.spec.shards.length} shards × ${state.spec.copies || 1} cop${(state.spec.copies || 1) === 1 ? 'y' : 'ies'} · ` +
    `${state.reassigned} reassigned` +
    (last ? ` · last round ${last.secs.toFixed(1)} s, ${last.tokens} tokens` : '') +
    ` · adapter ${short(state.rounds.length ? last.adapter : state.initial)}`;
  renderPlot(state);
  replaceRows(
    $('workers').tBodies[0],
    Object.entries(state.workers || {}).map(([k, w]) =>
      el(
        'tr',
        { class: 'worker' },
        el('td', {}, el('code', { title: k }, short(k))),
        el('td', {}, w.assigned),
        el('td', {}, w.accepted),
        el('td', {}, w.failed),
        el('td', {}, w.handed_back || 0),
        el('td', { class: w.wrong ? 'bad' : '' }, w.wrong),
        el('td', { class: 'bad' }, w.excluded ? `excluded: ${w.excluded}` : ''),
      ),
    ),
  );
  const verdicts = state.verdicts || [];
  $('no-verdicts').hidden = verdicts.length > 0;
  $('verdicts').replaceChildren(
    ...verdicts.map((v) =>
      el(
        'li',
        { class: 'verdict' },
        `round ${v.round}, shard ${v.shard}: ${v.why}. Caught: `,
        ...v.wrong.map(([k, out]) => el('code', { title: `returned ${out}` }, `${short(k)} `)),
        el('br'),
        'evidence: ',
        ...v.evidence.map((id) => el('code', { title: id }, `${short(id)} `)),
      ),
    ),
  );
}

function renderModels(models, node) {
  const list = (models && models.data) || [];
  $('models').replaceChildren(
    ...list.map((m) =>
      el(
        'li',
        {},
        el('code', { title: m.id }, short(m.id)),
        ` ${m.tern && m.tern.held_here ? 'held here' : 'in the swarm'}` +
          (m.tern && m.tern.peers ? `, ${m.tern.peers} peer${m.tern.peers === 1 ? '' : 's'}` : ''),
      ),
    ),
  );
  if (!list.length) $('models').replaceChildren(el('li', { class: 'muted' }, 'No model known yet.'));
  $('blobs').textContent = `${node.blobs} blobs, ${bytes(node.blob_bytes)} in this node's store`;
  const select = $('chat-model');
  const chosen = select.value;
  const ids = list.map((m) => m.id);
  if (ids.join() !== Array.from(select.options).map((o) => o.value).join()) {
    select.replaceChildren(
      ...list.map((m) => el('option', { value: m.id }, `${short(m.id)} (${m.tern && m.tern.held_here ? 'here' : 'swarm'})`)),
    );
    if (ids.includes(chosen)) select.value = chosen;
  }
}

// ---------------------------------------------------------------- polling

let lastModels = null;

let again = false;

async function refresh() {
  if (polling) {
    again = true;
    return;
  }
  polling = true;
  again = false;
  try {
    const view = await json('/v1/dashboard');
    renderNode(view.node);
    renderPeers(view.peers);
    renderTasks(view.tasks);
    renderJobs(view.jobs);
    if (selectedJob) {
      const detail = await json(`/v1/jobs/${selectedJob}`);
      renderJob(detail);
      if (detail.status && detail.status.run === 'running') watchJob(selectedJob);
    }
    if (polls % MODELS_EVERY === 0 || !lastModels) {
      lastModels = await json('/v1/models');
    }
    renderModels(lastModels, view.node);
    polls++;
    document.body.setAttribute('data-polls', String(polls));
    showError(null);
  } catch (e) {
    showError(e);
  } finally {
    polling = false;
    if (again) refresh();
  }
}

/** Reads a fetch response's body to its end, calling `onFrame` with each piece of text before `separator`. */
async function readFrames(response, separator, onFrame) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf(separator)) >= 0) {
      const frame = buf.slice(0, end);
      buf = buf.slice(end + separator.length);
      onFrame(frame);
    }
  }
}

// A running job's events (JSON lines) make the page refresh as they
// happen, so a round's point appears when the round ends rather than at
// the next poll.
let watching = null;

async function watchJob(id) {
  if (watching && watching.id === id) return;
  // One stream at a time: the one for another job closes now, not at its
  // next line (a quiet job sends one every 10 s).
  if (watching) watching.abort.abort();
  const me = { id, abort: new AbortController() };
  watching = me;
  try {
    const r = await api(`/v1/jobs/${id}/events`, { signal: me.abort.signal });
    await readFrames(r, '\n', (line) => {
      let e = null;
      try {
        e = JSON.parse(line);
      } catch (_) {
        return;
      }
      // Refreshes asked for while one runs come together in one more.
      if (['round_done', 'accepted', 'caught', 'failed', 'retrying', 'started'].includes(e.event)) refresh();
    });
  } catch (_) {
    // Aborted, or not running (any more): polling goes on.
  } finally {
    me.abort.abort();
    if (watching === me) watching = null;
  }
}

// ---------------------------------------------------------------- chat

const history_ = [];
let abort = null;

/** Reads server-sent events from a fetch response, calling `onData` with each `data:` payload. */
async function readEvents(response, onData) {
  await readFrames(response, '\n\n', (event) => {
    for (const line of event.split('\n')) {
      if (line.startsWith('data: ')) onData(line.slice(6));
    }
  });
}

async function send(text) {
  const log = $('chat-log');
  history_.push({ role: 'user', content: text });
  log.append(el('div', { class: 'msg user' }, text));
  const reply = el('div', { class: 'msg assistant', 'data-chunks': '0', 'data-done': 'false' });
  const body = el('span', { class: 'text' });
  reply.append(body);
  log.append(reply);
  log.scrollTop = log.scrollHeight;
  abort = new AbortController();
  $('chat-send').disabled = true;
  $('chat-stop').disabled = false;
  let content = '';
  let chunks = 0;
  let origin = null;
  let finish = null;
  try {
    const r = await api('/v1/chat/completions', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({
        model: $('chat-model').value,
        messages: history_,
        stream: true,
        max_tokens: Number($('chat-max').value) || 64,
        temperature: Number($('chat-temp').value),
      }),
      signal: abort.signal,
    });
    await readEvents(r, (data) => {
      if (data === '[DONE]') return;
      const chunk = JSON.parse(data);
      // A generation that fails mid-stream ends with an error event.
      if (chunk.error) throw new Error(chunk.error.message || 'the generation failed');
      if (chunk.tern) origin = chunk.tern;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.finish_reason) finish = choice.finish_reason;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        content += piece;
        chunks++;
        body.textContent = content;
        reply.setAttribute('data-chunks', String(chunks));
        log.scrollTop = log.scrollHeight;
      }
    });
    history_.push({ role: 'assistant', content });
    const how = origin
      ? origin.local
        ? 'computed by this node'
        : `computed by ${short(origin.worker)}${origin.verified ? ', verified here' : ''}`
      : '';
    reply.append(el('span', { class: 'meta' }, [how, finish ? `finish: ${finish}` : ''].filter(Boolean).join(' · ')));
  } catch (e) {
    history_.pop();
    reply.append(el('span', { class: 'meta bad' }, e.name === 'AbortError' ? 'stopped' : e.message || String(e)));
  } finally {
    // Closes the stream if it is still open (an error mid-way).
    abort.abort();
    reply.setAttribute('data-done', 'true');
    abort = null;
    $('chat-send').disabled = false;
    $('chat-stop').disabled = true;
  }
}

function startChat() {
  $('chat-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const input = $('chat-input');
    const text = input.value.trim();
    if (!text || abort) return;
    input.value = '';
    send(text);
  });
  // Closing the stream stops the generation on the node.
  $('chat-stop').addEventListener('click', () => abort && abort.abort());
}

startChat();
refresh();
setInterval(refresh, POLL_MS);
