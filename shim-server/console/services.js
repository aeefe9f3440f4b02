// The services table: listed once, then kept live from the stream of every service's events
// (GET /api/v1/events). An event marks its service stale; stale ones are re-read in small
// batches (or the whole list when many changed), so a burst of events costs a few requests.
import { api, follow } from './api.js';
import { h, replace, statusWord, copyButton, confirmDialog, toast, errorText } from './dom.js';

const PAGE_SIZE = 50;
const MANY = 30; // more stale services than this: re-list instead of one GET each

export function render(main) {
  const services = new Map(); // id → status view
  const rows = new Map(); // id → { tr, update(view) }
  const stale = new Set();
  let page = 0;
  let filter = '';
  let flushTimer = null;
  let shownIds = '';
  let loaded = false;
  const live = document.getElementById('live');

  const filterBox = h('input', {
    type: 'search', id: 'service-filter', placeholder: 'id, model, engine or status',
    'aria-describedby': 'service-summary',
    oninput: () => { filter = filterBox.value.trim().toLowerCase(); page = 0; draw(); },
  });
  const summary = h('span', { id: 'service-summary', class: 'muted', 'aria-live': 'polite' });
  const tbody = h('tbody');
  const empty = h('p', { class: 'muted', hidden: true });
  const pageInfo = h('span', { class: 'muted' });
  const prev = h('button', { type: 'button', onclick: () => { page--; draw(); } }, '← Previous');
  const next = h('button', { type: 'button', onclick: () => { page++; draw(); } }, 'Next →');

  replace(main,
    h('h1', {}, 'Services'),
    h('div', { class: 'toolbar' },
      h('label', { for: 'service-filter' }, 'Filter'), filterBox, summary,
      h('span', { class: 'spacer' }),
      h('a', { href: '#/deploy', class: 'button' }, 'Deploy a model')),
    h('div', { class: 'table-wrap' },
      h('table', { id: 'services-table' },
        h('caption', { class: 'skip' }, 'Services and their status'),
        h('thead', {}, h('tr', {},
          ['Status', 'Service', 'Model', 'Engine', 'Ready', 'Endpoint', 'Reason', 'Replicas'].map((t, i) =>
            h('th', { scope: 'col', class: i === 3 || i === 6 ? 'hide-narrow' : undefined }, t)),
          // Named for screen readers; the buttons say what they do.
          h('th', { scope: 'col' }, h('span', { class: 'sr-only' }, 'Actions')))),
        tbody)),
    empty,
    h('div', { class: 'pager' }, prev, pageInfo, next));

  function matches(view) {
    if (!filter) return true;
    return [view.serviceId, view.modelName, view.engine, view.status, view.reason]
      .some((v) => v && String(v).toLowerCase().includes(filter));
  }

  // Draws the current page, reusing row elements so a focused input survives updates.
  function draw() {
    // Newest first: the API lists oldest first, and services seen later are added at the end.
    const all = [...services.values()].reverse();
    const visible = all.filter(matches);
    const pages = Math.max(1, Math.ceil(visible.length / PAGE_SIZE));
    page = Math.min(Math.max(page, 0), pages - 1);
    const slice = visible.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE);
    const ids = slice.map((v) => v.serviceId).join(',');
    for (const view of slice) rowFor(view).update(view);
    if (ids !== shownIds) {
      tbody.replaceChildren(...slice.map((v) => rows.get(v.serviceId).tr));
      shownIds = ids;
    }
    for (const id of rows.keys()) if (!services.has(id)) rows.delete(id);
    const counts = {};
    for (const v of all) counts[v.status] = (counts[v.status] || 0) + 1;
    summary.textContent = `${all.length} service${all.length === 1 ? '' : 's'}` +
      Object.entries(counts).map(([k, n]) => ` · ${n} ${k}`).join('') +
      (filter ? ` · ${visible.length} match` : '');
    empty.hidden = !loaded || visible.length > 0;
    empty.textContent = all.length ? 'No service matches the filter.' : 'No services yet. Deploy a model to start one.';
    pageInfo.textContent = `Page ${page + 1} of ${pages}`;
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }

  function rowFor(view) {
    const id = view.serviceId;
    if (rows.has(id)) return rows.get(id);
    const status = h('td');
    const model = h('td', { class: 'nowrap' });
    const engine = h('td', { class: 'hide-narrow' });
    const ready = h('td', { class: 'mono' });
    const endpoint = h('td');
    const reason = h('td', { class: 'reason hide-narrow' });
    const replicas = h('input', { type: 'number', min: '0', max: '64', 'aria-label': `Desired replicas of ${id}` });
    const scale = h('button', { type: 'button', class: 'small', onclick: () => setReplicas(id, replicas) }, 'Set');
    const remove = h('button', { type: 'button', class: 'small danger', onclick: () => remove_(id) }, 'Delete');
    const tr = h('tr', { dataset: { id } },
      status, h('td', {}, h('a', { href: `#/service/${encodeURIComponent(id)}`, class: 'mono' }, id)),
      model, engine, ready, endpoint, reason,
      h('td', {}, h('span', { class: 'inline' }, replicas, scale)),
      h('td', {}, remove));
    let last = '';
    let lastDesired = null;
    const row = {
      tr,
      update(v) {
        const key = JSON.stringify(v);
        if (key === last) return;
        last = key;
        replace(status, statusWord(v.status));
        model.textContent = v.modelName || '';
        engine.textContent = v.engine || 'default';
        ready.textContent = v.desiredReplicas === undefined ? '–' : `${v.readyReplicas ?? 0}/${v.desiredReplicas}`;
        replace(endpoint, v.endpoint
          ? h('span', { class: 'endpoint' }, h('code', { title: v.endpoint }, v.endpoint), copyButton(v.endpoint))
          : h('span', { class: 'muted' }, '–'));
        const why = [v.reason, v.message].filter(Boolean).join(': ');
        // Long runtime messages are clamped to two lines; the whole text is in the tooltip and
        // on the detail page.
        replace(reason, why ? h('div', { class: 'clamp', title: why }, why) : '');
        // Keep what the operator is typing; follow the server otherwise.
        if (document.activeElement !== replicas || lastDesired === null) replicas.value = v.desiredReplicas ?? '';
        lastDesired = v.desiredReplicas;
        const gone = v.status === 'terminating' || v.status === 'notExist';
        replicas.disabled = scale.disabled = remove.disabled = gone;
      },
    };
    rows.set(id, row);
    return row;
  }

  async function setReplicas(id, input) {
    const view = services.get(id);
    const count = Number(input.value);
    if (!view || !Number.isInteger(count) || count < 0) { toast('Replicas must be a whole number', 'error'); return; }
    try {
      // A merge patch of the one field: the rest of the stored spec (environment included,
      // which the status does not show) is kept by the server.
      await api(`/api/v1/modserv/${encodeURIComponent(id)}`, { method: 'PATCH', body: { replicaCount: count } });
      toast(`${id}: ${count} replica(s) requested`);
    } catch (err) {
      toast(`Update of ${id} failed: ${errorText(err)}`, 'error');
    }
  }

  async function remove_(id) {
    const view = services.get(id);
    if (!(await confirmDialog(`Delete service ${id} (${view?.modelName || 'unknown model'})? Its engine is stopped.`, 'Delete'))) return;
    try {
      await api(`/api/v1/modserv/${encodeURIComponent(id)}`, { method: 'DELETE' });
      toast(`Deleting ${id}`);
    } catch (err) {
      toast(`Delete of ${id} failed: ${errorText(err)}`, 'error');
    }
  }

  let redraw = null;
  function scheduleDraw() {
    if (redraw === null) redraw = requestAnimationFrame(() => { redraw = null; draw(); });
  }

  function put(view) {
    if (view.status === 'notExist') services.delete(view.serviceId);
    else services.set(view.serviceId, view);
  }

  async function reload() {
    try {
      const list = await api('/api/v1/modserv');
      services.clear();
      for (const view of list) put(view);
      loaded = true;
      scheduleDraw();
    } catch (err) {
      toast(`Listing services failed: ${errorText(err)}`, 'error');
    }
  }

  // One re-read at a time: events that arrive meanwhile wait for the next round, so a burst
  // (a thousand deploys) costs a few list reads rather than a request per event.
  let busy = false;
  async function flush() {
    flushTimer = null;
    if (busy) return;
    busy = true;
    const ids = [...stale];
    stale.clear();
    try {
      if (ids.length > MANY) await reload();
      else {
        await Promise.all(ids.map(async (id) => {
          try { put(await api(`/api/v1/modserv/${encodeURIComponent(id)}`)); } catch { /* next event retries */ }
        }));
        scheduleDraw();
      }
    } finally {
      busy = false;
      if (stale.size && flushTimer === null && !stopped) flushTimer = setTimeout(flush, 150);
    }
  }

  const stop = follow('/api/v1/events', {
    onOpen: reload, // (re)connected: anything may have changed meanwhile
    onLagged: reload,
    onState: (on) => { live.textContent = on ? 'live' : 'reconnecting…'; live.className = `live ${on ? 'on' : 'off'}`; },
    onEvent: (event) => {
      if (!event.serviceId) return;
      stale.add(event.serviceId);
      if (flushTimer === null) flushTimer = setTimeout(flush, 150);
    },
  });
  draw();

  let stopped = false;
  return () => {
    stopped = true;
    stop();
    clearTimeout(flushTimer);
    if (redraw !== null) cancelAnimationFrame(redraw);
    live.textContent = '';
    live.className = 'live';
  };
}
