// The console's shell: hash routing between pages, theme, operator token dialog.
import { onTokenNeeded, tokens } from './api.js';
import { replace, h } from './dom.js';
import * as services from './services.js';
import * as deploy from './deploy.js';
import * as detail from './detail.js';
import * as playground from './playground.js';
import * as inventory from './inventory.js';

const pages = {
  services: { title: 'Services', render: services.render },
  deploy: { title: 'Deploy', render: deploy.render },
  service: { title: 'Service', render: detail.render, nav: 'services' },
  playground: { title: 'Playground', render: playground.render },
  gpus: { title: 'GPUs', render: inventory.renderGpus },
  plugins: { title: 'Plugins', render: inventory.renderPlugins },
};

const main = document.getElementById('main');
let cleanup = null;

function route() {
  // `#/page/param…?query`: the query is the page's own (e.g. the playground's model).
  const [path] = location.hash.replace(/^#/, '').split('?');
  const [, name = 'services', ...rest] = path.split('/');
  const page = pages[name] || pages.services;
  if (cleanup) { cleanup(); cleanup = null; }
  for (const link of document.querySelectorAll('#nav a')) {
    if (link.dataset.page === (page.nav || name)) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  document.title = `${page.title} · xmod-shim`;
  replace(main);
  const params = rest.map(decodeURIComponent);
  try {
    cleanup = page.render(main, params) || null;
  } catch (err) {
    replace(main, h('p', { class: 'reason' }, `This page failed: ${err.message}`));
  }
  main.focus({ preventScroll: true });
}

// Theme: the system's preference unless the toggle chose; the choice is kept across visits.
const THEME_KEY = 'xmod.theme';
const themeButton = document.getElementById('theme-toggle');
function effectiveDark() {
  const chosen = localStorage.getItem(THEME_KEY);
  return chosen ? chosen === 'dark' : matchMedia('(prefers-color-scheme: dark)').matches;
}
function applyTheme() {
  const chosen = localStorage.getItem(THEME_KEY);
  if (chosen) document.documentElement.dataset.theme = chosen;
  else delete document.documentElement.dataset.theme;
  const dark = effectiveDark();
  themeButton.textContent = dark ? 'Light theme' : 'Dark theme';
  themeButton.setAttribute('aria-pressed', String(dark));
}
themeButton.addEventListener('click', () => {
  const want = effectiveDark() ? 'light' : 'dark';
  const system = matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light';
  // Back to the system's choice when the toggle lands on it, so it follows the system again.
  if (want === system) localStorage.removeItem(THEME_KEY);
  else localStorage.setItem(THEME_KEY, want);
  applyTheme();
});
matchMedia('(prefers-color-scheme: dark)').addEventListener('change', applyTheme);
applyTheme();

// Operator token: asked for when a change is refused with 401, or from the header button.
const tokenDialog = document.getElementById('token-dialog');
const tokenInput = document.getElementById('token-input');
const tokenButton = document.getElementById('token-button');
function showTokenState() {
  tokenButton.textContent = tokens.operator() ? 'Operator token ✓' : 'Operator token';
}
function askToken(why) {
  document.getElementById('token-why').textContent =
    `${why || ''} Changes need the operator token; it is kept in this tab's session storage only.`.trim();
  tokenInput.value = tokens.operator();
  tokenDialog.returnValue = '';
  tokenDialog.showModal();
  return new Promise((resolve) => {
    tokenDialog.addEventListener('close', () => {
      const choice = tokenDialog.returnValue;
      if (choice === 'ok') tokens.setOperator(tokenInput.value.trim());
      if (choice === 'clear') tokens.setOperator('');
      tokenInput.value = '';
      showTokenState();
      resolve(choice === 'ok' && Boolean(tokens.operator()));
    }, { once: true });
  });
}
onTokenNeeded(askToken);
tokenButton.addEventListener('click', () => askToken(''));
showTokenState();

window.addEventListener('hashchange', route);
route();
