// One service: status, replicas and addresses, pipeline steps with progress and durations, the
// event timeline (streamed), and the engine log (its tail, or followed as a stream).
import { api, follow } from './api.js';
import { h, replace, statusWord, copyButton, duration, time, errorText, confirmDialog, toast } from './dom.js';

const MAX_TIMELINE = 500;

export function describe(e) {
  switch (e.type) {
    case 'accepted': return `${e.action} accepted`;
    case 'transition': return `${e.from ?? 'new'} → ${e.to}${e.reason ? ` (${e.reason})` : ''}${e.message ? `: ${e.message}` : ''}`;
    case 'stepStarted': return `step ${e.step} started (attempt ${e.attempt})`;
    case 'stepProgress': return `step ${e.step}: ${e.message}`;
    case 'stepRetrying': return `step ${e.step} attempt ${e.attempt} failed, retrying in ${duration(e.delayMs)}: ${e.error}`;
    case 'stepSucceeded': return `step ${e.step} ${e.skipped ? 'skipped (goal held)' : 'succeeded'} in ${duration(e.durationMs)}`;
    case 'stepFailed': return `step ${e.step} failed: ${e.error}`;
    case 'observed': return `runtime: ${e.ready}/${e.desired} ready — ${e.message}`;
    default: return `${e.type}: ${JSON.stringify(e)}`;
  }
}

const MARKS = { pending: '○', running: '◐', retrying: '↻', succeeded: '✓', skipped: '↷', failed: '✗' };

export function render(main, [id]) {
  if (!id) { location.hash = '#/services'; return null; }
  const path = `/api/v1/modserv/${encodeURIComponent(id)}`;
  const started = new Map(); // step → start time of its running attempt
  let refreshTimer = null;
  let closed = false;

  const heading = h('h1', {}, 'Service ', h('span', { class: 'mono' }, id));
  const facts = h('dl', { class: 'kv', id: 'service-facts' });
  const replicaList = h('div', { id: 'replicas' });
  const progress = h('div', { class: 'bar', role: 'progressbar', 'aria-label': 'Pipeline progress', 'aria-valuemin': '0', 'aria-valuemax': '100' }, h('span', { style: undefined }));
  const stepsList = h('ol', { class: 'steps', id: 'steps' });
  const pipelineName = h('span', { class: 'muted' });
  const timeline = h('ol', { class: 'timeline', id: 'timeline', 'aria-live': 'polite' });
  const logs = h('pre', { id: 'logs', tabindex: '0', 'aria-label': 'Engine log' }, 'Press “Show logs” to read the engine log.');
  const tail = h('input', { id: 'log-tail', type: 'number', min: '1', max: '10000', value: '200' });
  const followBox = h('input', { id: 'log-follow', type: 'checkbox', checked: true });
  const logButton = h('button', { type: 'button', id: 'show-logs', onclick: () => loadLogs() }, 'Show logs');
  const deleteButton = h('button', { type: 'button', class: 'danger', onclick: remove_ }, 'Delete');
  const tryLink = h('a', { class: 'button', hidden: true }, 'Try in the playground');

  replace(main,
    h('p', {}, h('a', { href: '#/services' }, '← Services')),
    heading,
    h('div', { class: 'grid-2' },
      h('section', { class: 'panel', 'aria-labelledby': 'h-status' },
        h('h2', { id: 'h-status' }, 'Status'), facts,
        h('h2', { id: 'h-replicas' }, 'Replicas'), replicaList,
        h('div', { class: 'actions' }, tryLink, deleteButton)),
      h('section', { class: 'panel', 'aria-labelledby': 'h-pipeline' },
        h('h2', { id: 'h-pipeline' }, 'Pipeline ', pipelineName), progress, stepsList)),
    h('section', { class: 'panel', 'aria-labelledby': 'h-events' },
      h('h2', { id: 'h-events' }, 'Events'), timeline),
    h('section', { class: 'panel', 'aria-labelledby': 'h-logs' },
      h('h2', { id: 'h-logs' }, 'Engine log'),
      h('div', { class: 'toolbar' },
        h('label', { for: 'log-tail' }, 'Last lines'), tail,
        h('label', {}, followBox, ' Follow'), logButton),
      logs));

  function fact(k, v) { return [h('dt', {}, k), h('dd', {}, v)]; }

  async function refresh() {
    refreshTimer = null;
    try {
      const [s, p] = await Promise.all([api(path), api(`${path}/pipeline`).catch(() => null)]);
      if (closed) return;
      replace(facts,
        fact('Status', statusWord(s.status)),
        fact('Model', s.modelName || '–'),
        fact('Engine', s.engine || 'server default'),
        fact('Ready', s.desiredReplicas === undefined ? '–' : `${s.readyReplicas ?? 0} of ${s.desiredReplicas}`),
        fact('GPUs per replica', s.acceleratorCount ?? '–'),
        fact('Context length', s.contextLength ?? 'engine default'),
        fact('Generation', s.generation ?? '–'),
        fact('Endpoint', s.endpoint ? h('span', { class: 'endpoint' }, h('code', {}, s.endpoint), copyButton(s.endpoint)) : '–'),
        fact('Updated', `${s.updateTime} UTC`),
        (s.reason || s.message) ? fact('Reason', h('span', { class: 'reason' }, [s.reason, s.message].filter(Boolean).join(': '))) : null);
      deleteButton.disabled = s.status === 'terminating' || s.status === 'notExist';
      tryLink.hidden = s.status !== 'running';
      tryLink.href = `#/playground?model=${encodeURIComponent(s.modelName || '')}`;
      const replicas = Array.isArray(s.replicas) ? s.replicas : null;
      replace(replicaList, replicas
        ? (replicas.length
          ? h('ul', {}, replicas.map((r) => {
            const url = typeof r === 'string' ? r : (r.url || r.address || JSON.stringify(r));
            return h('li', {}, h('span', { class: 'endpoint' }, h('code', {}, url), copyButton(url)));
          }))
          : h('p', { class: 'muted' }, 'No replica is ready.'))
        : h('p', { class: 'muted' }, s.endpoint
          ? `${s.readyReplicas ?? 0} ready behind the endpoint (this server does not list replica addresses).`
          : 'No ready replica yet.'));
      if (p) showPipeline(p);
    } catch (err) {
      replace(facts, fact('Error', h('span', { class: 'reason' }, errorText(err))));
    }
  }

  function showPipeline(p) {
    pipelineName.textContent = `${p.pipeline} · generation ${p.generation}`;
    const done = p.steps.filter((s) => ['succeeded', 'skipped'].includes(s.state)).length;
    const pct = p.steps.length ? Math.round((100 * done) / p.steps.length) : 0;
    progress.firstChild.style.width = `${pct}%`;
    progress.setAttribute('aria-valuenow', String(pct));
    progress.setAttribute('aria-valuetext', `${done} of ${p.steps.length} steps done`);
    replace(stepsList, p.steps.map((s) => {
      let took = duration(s.durationMs);
      if (!took && s.state === 'running' && started.has(s.name)) took = `${duration(Date.now() - started.get(s.name))} so far`;
      return h('li', { dataset: { state: s.state } },
        h('span', { class: 'mark', 'aria-hidden': 'true' }, MARKS[s.state] || '·'),
        h('strong', {}, s.name),
        h('span', { class: s.state === 'failed' ? 'reason' : 'muted' },
          s.state, s.attempts > 1 ? ` · ${s.attempts} attempts` : '', s.message ? ` · ${s.message}` : '', s.lastError ? ` · ${s.lastError}` : ''),
        h('span', { class: 'mono' }, took));
    }));
  }

  function scheduleRefresh() {
    if (refreshTimer === null) refreshTimer = setTimeout(refresh, 150);
  }

  function addEvent(e) {
    if (e.type === 'stepStarted') started.set(e.step, new Date(e.time).getTime());
    // The server ends the stream once the service is gone; do not let EventSource reconnect.
    if (e.type === 'transition' && e.to === 'deleted') stop();
    timeline.prepend(h('li', {}, h('time', { datetime: e.time }, time(e.time)), describe(e)));
    while (timeline.childElementCount > MAX_TIMELINE) timeline.lastElementChild.remove();
    scheduleRefresh();
  }

  // The tail once, or (Follow) the server's log stream: a first message with the tail, then
  // the lines added since; an event named `reset` replaces everything shown.
  let logSource = null;
  function stopFollowing() { logSource?.close(); logSource = null; }
  function tailSize() { return Math.min(Math.max(Number(tail.value) || 200, 1), 10000); }
  function showLines(lines) {
    const atBottom = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
    logs.textContent = lines.length ? lines.join('\n') : '(no output yet)';
    if (atBottom) logs.scrollTop = logs.scrollHeight;
  }

  async function loadLogs() {
    stopFollowing();
    logButton.textContent = 'Reload logs';
    const n = tailSize();
    if (followBox.checked) {
      let lines = [];
      let fresh = true;
      const source = new EventSource(`${path}/logs?tail=${n}&follow=true`);
      logSource = source;
      const split = (data) => (data === '' ? [] : data.split('\n'));
      // Every connection starts with the whole tail, so a reconnect never doubles lines.
      source.onopen = () => { fresh = true; };
      source.onmessage = (m) => {
        lines = fresh ? split(m.data) : lines.concat(split(m.data));
        fresh = false;
        if (lines.length > n) lines = lines.slice(lines.length - n);
        showLines(lines);
      };
      source.addEventListener('reset', (m) => { lines = split(m.data); fresh = false; showLines(lines); });
      source.onerror = () => {
        // Refused (no such service, a runtime without logs): read once to show why.
        if (source.readyState === EventSource.CLOSED && logSource === source) { stopFollowing(); readOnce(n); }
      };
      return;
    }
    await readOnce(n);
  }

  async function readOnce(n) {
    try {
      const data = await api(`${path}/logs?tail=${n}`);
      if (!closed) { showLines(data.logs ? data.logs.replace(/\n$/, '').split('\n') : []); logs.scrollTop = logs.scrollHeight; }
    } catch (err) {
      if (!closed) logs.textContent = `Logs unavailable: ${errorText(err)}`;
    }
  }
  followBox.addEventListener('change', () => {
    if (!followBox.checked) stopFollowing();
    else if (logButton.textContent !== 'Show logs') loadLogs();
  });

  async function remove_() {
    if (!(await confirmDialog(`Delete service ${id}? Its engine is stopped.`, 'Delete'))) return;
    try {
      await api(path, { method: 'DELETE' });
      toast(`Deleting ${id}`);
    } catch (err) {
      toast(`Delete failed: ${errorText(err)}`, 'error');
    }
  }

  // The stream replays the history, then follows; on a reconnect it replays again.
  const stop = follow(`${path}/events?limit=200`, {
    onOpen: () => { timeline.replaceChildren(); refresh(); },
    onEvent: addEvent,
    onLagged: refresh,
  });
  refresh();

  return () => {
    closed = true;
    stop();
    clearTimeout(refreshTimer);
    stopFollowing();
  };
}
