// Read-only pages: the GPU inventory (who holds what) and the registered plugins.
import { api, optionalApi } from './api.js';
import { h, replace, bytes, errorText } from './dom.js';

export function renderGpus(main) {
  const body = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  replace(main, h('h1', {}, 'GPUs'), body);
  (async () => {
    try {
      const [data, services] = await Promise.all([optionalApi('/api/v1/gpus'), api('/api/v1/modserv').catch(() => [])]);
      const models = new Map(services.map((s) => [s.serviceId, s.modelName]));
      if (data === null) { replace(body, h('p', { class: 'muted' }, 'This server does not report GPUs (no /api/v1/gpus).')); return; }
      const gpus = data.gpus || [];
      if (!gpus.length) { replace(body, h('p', { class: 'muted' }, 'No GPU found on this machine.')); return; }
      replace(body, h('div', { class: 'table-wrap' }, h('table', { id: 'gpus-table' },
        h('thead', {}, h('tr', {}, ['#', 'Name', 'Memory used', '', 'Free', 'Held by'].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, gpus.map((g) => {
          const known = Boolean(g.memoryTotalBytes);
          const pct = known ? Math.round((100 * (g.memoryUsedBytes || 0)) / g.memoryTotalBytes) : 0;
          const bar = known ? h('div', { class: 'bar', role: 'img', 'aria-label': `${pct}% used` }, h('span')) : '';
          if (known) bar.firstChild.style.width = `${pct}%`;
          const holders = Array.isArray(g.heldBy) ? g.heldBy : (g.heldBy ? [g.heldBy] : []);
          return h('tr', {},
            h('td', {}, String(g.index)),
            h('td', {}, g.name || `GPU ${g.id ?? g.index}`, h('div', { class: 'muted mono' }, g.uuid || (g.name ? '' : 'declared in config'))),
            h('td', {}, known ? `${bytes(g.memoryUsedBytes)} of ${bytes(g.memoryTotalBytes)}` : h('span', { class: 'muted' }, 'not reported')),
            h('td', {}, bar),
            h('td', {}, known ? bytes(g.memoryFreeBytes) : '–'),
            h('td', { class: 'held' }, holders.length
              ? holders.map((id) => h('div', {}, h('a', { href: `#/service/${encodeURIComponent(id)}`, class: 'mono' }, id),
                models.has(id) ? ` ${models.get(id)}` : ''))
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
