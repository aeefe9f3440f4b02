// Deploy form: models found under the model root, engine preset, replicas, GPUs, context length.
// The dry run (what would be created and the memory estimate) is shown before the deploy button
// is enabled; changing the form asks for a new dry run.
import { api, optionalApi } from './api.js';
import { h, replace, toast, bytes, count, errorText } from './dom.js';

const ENGINES = [
  ['', 'Server default'], ['vllm', 'vLLM'], ['sglang', 'SGLang'], ['llamacpp', 'llama.cpp server'],
  ['llama-cpp-python', 'llama-cpp-python'], ['mock', 'Mock (built-in, no model loaded)'],
];

function modelFacts(m) {
  const facts = [];
  if (m.format) facts.push(m.format);
  if (m.architecture) facts.push(m.architecture);
  if (m.parameters) facts.push(`${count(m.parameters)} params`);
  if (m.quantization) facts.push(m.quantization);
  if (m.weightsBytes) facts.push(bytes(m.weightsBytes));
  if (m.maxContextLength) facts.push(`ctx ≤ ${m.maxContextLength}`);
  return facts;
}

export function render(main) {
  let models = [];
  let previewed = null; // the body the shown dry run was made for
  const controller = new AbortController();

  const model = h('select', { id: 'deploy-model', required: true });
  const modelInfo = h('span', { class: 'hint muted', id: 'deploy-model-info' });
  const engine = h('select', { id: 'deploy-engine' }, ENGINES.map(([v, t]) => h('option', { value: v }, t)));
  const replicas = h('input', { id: 'deploy-replicas', type: 'number', min: '0', max: '64', value: '1', required: true });
  const gpus = h('input', { id: 'deploy-gpus', type: 'number', min: '0', max: '64', value: '0' });
  const context = h('input', { id: 'deploy-context', type: 'number', min: '1', placeholder: 'default' });
  const env = h('textarea', { id: 'deploy-env', rows: '2', spellcheck: 'false', class: 'mono', placeholder: 'KEY=value, one per line' });
  const previewButton = h('button', { type: 'submit', class: 'primary', id: 'deploy-preview' }, 'Preview (dry run)');
  const deployButton = h('button', { type: 'button', id: 'deploy-confirm', disabled: true, onclick: confirm }, 'Deploy');
  const result = h('section', { id: 'dry-run', 'aria-live': 'polite' });
  const formError = h('p', { class: 'reason', role: 'alert', id: 'deploy-error' });

  const form = h('form', { class: 'panel', onsubmit: (e) => { e.preventDefault(); preview(); }, oninput: invalidate, onchange: invalidate },
    h('div', { class: 'form' },
      h('label', { for: 'deploy-model' }, 'Model'), model, modelInfo,
      h('label', { for: 'deploy-engine' }, 'Engine'), engine,
      h('label', { for: 'deploy-replicas' }, 'Replicas'), replicas,
      h('label', { for: 'deploy-gpus' }, 'GPUs per replica'), gpus,
      h('label', { for: 'deploy-context' }, 'Context length'), context,
      h('span', { class: 'hint muted', id: 'deploy-context-hint' }, 'Tokens; empty for the engine\'s default.'),
      h('label', { for: 'deploy-env' }, 'Environment'), env),
    formError,
    h('div', { class: 'actions' }, previewButton, deployButton));

  replace(main, h('h1', {}, 'Deploy a model'), form, result);

  function body() {
    const b = { modelName: model.value, replicaCount: Number(replicas.value), resourceRequirements: { acceleratorCount: Number(gpus.value || 0) } };
    if (engine.value) b.engine = engine.value;
    if (context.value) b.contextLength = Number(context.value);
    const vars = env.value.split('\n').map((l) => l.trim()).filter(Boolean).map((l) => {
      const at = l.indexOf('=');
      return at < 0 ? { key: l, value: '' } : { key: l.slice(0, at).trim(), value: l.slice(at + 1) };
    });
    if (vars.length) b.env = vars;
    return b;
  }

  function showModel() {
    const m = models.find((x) => x.modelName === model.value);
    modelInfo.textContent = m ? (modelFacts(m).join(' · ') || m.modelPath) : '';
    document.getElementById('deploy-context-hint').textContent = m?.maxContextLength
      ? `Tokens; the model allows up to ${m.maxContextLength}. Empty for the engine's default.`
      : 'Tokens; empty for the engine\'s default.';
  }

  function invalidate() {
    showModel();
    if (previewed && JSON.stringify(previewed) !== JSON.stringify(body())) {
      previewed = null;
      deployButton.disabled = true;
      replace(result, h('p', { class: 'muted' }, 'The form changed: preview again before deploying.'));
    }
  }

  async function preview() {
    formError.textContent = '';
    if (!model.value) { formError.textContent = 'Choose a model.'; return; }
    const b = body();
    previewButton.disabled = true;
    replace(result, h('p', { class: 'muted' }, 'Rendering…'));
    try {
      const dry = await api('/api/v1/modserv/deploy?dryRun=true', { method: 'POST', body: b, signal: controller.signal });
      previewed = b;
      showDryRun(dry);
      const fits = dry?.estimate ? dry.estimate.fits !== false : true;
      deployButton.disabled = false;
      deployButton.className = fits ? 'primary' : 'danger';
      deployButton.textContent = fits ? 'Deploy' : 'Deploy anyway';
      deployButton.focus();
    } catch (err) {
      // A dry run that does not fit is refused (422) with its estimate: show the numbers, and
      // keep Deploy off, since the deploy would be refused the same way.
      if (err.data?.estimate) showDryRun(err.data);
      else replace(result);
      formError.textContent = `Dry run failed: ${errorText(err)}`;
    } finally {
      previewButton.disabled = false;
    }
  }

  function showDryRun(dry) {
    const est = dry?.estimate;
    replace(result,
      h('h2', {}, 'What would be created'),
      est ? h('div', { class: 'panel', id: 'estimate' },
        h('p', {}, h('span', { class: est.fits ? 'fit-ok' : 'fit-no' }, est.fits ? 'Fits' : 'Does not fit'),
          est.message ? ` — ${est.message}` : ''),
        h('dl', { class: 'kv' }, [
          ['Per GPU', bytes(est.perGpuBytes)], ['Weights', bytes(est.weightsBytes)], ['KV cache', bytes(est.kvCacheBytes)],
          ['Overhead', bytes(est.overheadBytes)], ['Context length', est.contextLength ?? '–'],
          ['Max context length', est.maxContextLength ?? '–'], ['Tensor parallel', est.tensorParallel ?? '–'],
        ].map(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))])),
      ) : h('p', { class: 'muted' }, 'No memory estimate for this model (the server gives one for models it can inspect).'),
      (dry?.workloads || []).map((w, i) => h('details', { class: 'panel', open: i === 0 },
        h('summary', {}, `Workload ${i + 1}: ${w.image || w.command?.[0] || ''}`),
        h('pre', {}, JSON.stringify(w, null, 2)))),
      (dry?.manifests || []).map((m, i) => h('details', { class: 'panel' },
        h('summary', {}, `Runtime object ${i + 1}`), h('pre', {}, JSON.stringify(m, null, 2)))));
  }

  async function confirm() {
    const b = previewed;
    if (!b) return;
    deployButton.disabled = true;
    try {
      const data = await api('/api/v1/modserv/deploy', { method: 'POST', body: b });
      toast(`Deploying ${b.modelName} as ${data.serviceId}`);
      location.hash = `#/service/${encodeURIComponent(data.serviceId)}`;
    } catch (err) {
      formError.textContent = `Deploy failed: ${errorText(err)}`;
      deployButton.disabled = false;
    }
  }

  (async () => {
    try {
      const [list, gpuData] = await Promise.all([api('/api/v1/modserv/list'), optionalApi('/api/v1/gpus').catch(() => null)]);
      models = list || [];
      if (gpuData?.gpus?.length) gpus.value = '1';
      replace(model, models.length
        ? models.map((m) => h('option', { value: m.modelName }, [m.modelName, ...modelFacts(m).slice(2, 4)].join(' — ')))
        : h('option', { value: '' }, 'No models under the model root'));
      showModel();
    } catch (err) {
      formError.textContent = `Listing models failed: ${errorText(err)}`;
    }
  })();

  return () => controller.abort();
}
