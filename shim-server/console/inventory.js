// Read-only pages: the GPU inventory (who holds what) and the registered plugins.
import { api, optionalApi } from './api.js';
import { h, replace, bytes, errorText } from './dom.js';

export function renderGpus(main) {
  const body = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  replace(main, h('h1', {}, 'GPUs'), body);
  (async () => {
    try {
      const data = await optionalApi('/api/v1/gpus');
      if (data === null) { replace(body, h('p', { class: 'muted' }, 'This server does not report GPUs (no /api/v1/gpus).')); return; }
      const gpus = data.gpus || [];
      if (!gpus.length) { replace(body, h('p', { class: 'muted' }, 'No GPU found on this machine.')); return; }
      replace(body, h('div', { class: 'table-wrap' }, h('table', { id: 'gpus-table' },
        h('thead', {}, h('tr', {}, ['#', 'Name', 'Memory used', '', 'Free', 'Held by'].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, gpus.map((g) => {
          const pct = g.memoryTotalBytes ? Math.round((100 * (g.memoryUsedBytes || 0)) / g.memoryTotalBytes) : 0;
          const bar = h('div', { class: 'bar', role: 'img', 'aria-label': `${pct}% used` }, h('span'));
          bar.firstChild.style.width = `${pct}%`;
          const holders = Array.isArray(g.heldBy) ? g.heldBy : (g.heldBy ? [g.heldBy] : []);
          return h('tr', {},
            h('td', {}, String(g.index)),
            h('td', {}, g.name || '', h('div', { class: 'muted mono' }, g.uuid || '')),
            h('td', {}, `${bytes(g.memoryUsedBytes)} of ${bytes(g.memoryTotalBytes)}`),
            h('td', {}, bar),
            h('td', {}, bytes(g.memoryFreeBytes)),
            h('td', {}, holders.length
              ? holders.map((id) => h('a', { href: `#/service/${encodeURIComponent(id)}`, class: 'mono' }, `${id} `))
              : h('span', { class: 'muted' }, 'free')));
        })))));
    } catch (err) {
      replace(body, h('p', { class: 'reason' }, `Listing GPUs failed: ${errorText(err)}`));
    }
  })();
  return null;
}

export function renderPlugins(main) {
  const body = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  replace(main, h('h1', {}, 'Plugins'), body);
  const table = (title, entries) => h('section', { class: 'panel' },
    h('h2', {}, title),
    h('table', {}, h('thead', {}, h('tr', {}, ['Name', 'Description', ''].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, (entries || []).map((e) => h('tr', {},
        h('td', { class: 'mono' }, e.name), h('td', {}, e.description || ''),
        h('td', {}, e.active ? h('span', { class: 'badge' }, 'active') : ''))))));
  (async () => {
    try {
      const data = await api('/api/v1/plugins');
      replace(body, h('p', { class: 'muted' }, 'Registered at build time; the active ones were chosen at start-up.'),
        table('Shimlets (runtimes)', data.shimlets), table('Pipelines', data.pipelines));
    } catch (err) {
      replace(body, h('p', { class: 'reason' }, `Listing plugins failed: ${errorText(err)}`));
    }
  })();
  return null;
}
