// Chat with a model through the OpenAI gateway (/v1/chat/completions on this server), streamed
// token by token. The gateway key is separate from the operator token.
import { api, gatewayModels, streamChat, tokens } from './api.js';
import { h, replace, errorText } from './dom.js';

export function render(main) {
  const history = [];
  let controller = null;

  const model = h('select', { id: 'chat-model' });
  const key = h('input', { id: 'gateway-key', type: 'password', autocomplete: 'off', value: tokens.gateway(), placeholder: 'only if the gateway needs one' });
  const maxTokens = h('input', { id: 'chat-max-tokens', type: 'number', min: '1', max: '32768', value: '256' });
  const notice = h('p', { class: 'muted', id: 'chat-notice' });
  const transcript = h('div', { class: 'chat panel', id: 'chat', 'aria-live': 'polite', 'aria-label': 'Conversation' });
  const prompt = h('textarea', { id: 'chat-input', rows: '3', placeholder: 'Say something… (Ctrl+Enter sends)' });
  const send = h('button', { type: 'submit', class: 'primary', id: 'chat-send' }, 'Send');
  const stopButton = h('button', { type: 'button', id: 'chat-stop', disabled: true, onclick: () => controller?.abort() }, 'Stop');
  const clear = h('button', { type: 'button', class: 'ghost', onclick: () => { history.length = 0; transcript.replaceChildren(); } }, 'Clear');

  // A new key may open a list that a 401 kept closed.
  key.addEventListener('change', () => { tokens.setGateway(key.value.trim()); loadModels(); });
  prompt.addEventListener('keydown', (e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); } });

  const form = h('form', { onsubmit: (e) => { e.preventDefault(); ask(); } },
    h('label', { for: 'chat-input' }, 'Message'), h('div', {}, prompt),
    h('div', { class: 'actions' }, clear, stopButton, send));

  replace(main,
    h('h1', {}, 'Playground'),
    h('div', { class: 'panel' },
      h('div', { class: 'form' },
        h('label', { for: 'chat-model' }, 'Model'), model,
        h('label', { for: 'gateway-key' }, 'Gateway API key'), key,
        h('label', { for: 'chat-max-tokens' }, 'Max tokens'), maxTokens),
      notice),
    transcript, form);
  prompt.style.width = '100%';

  async function ask() {
    const text = prompt.value.trim();
    if (!text || !model.value) return;
    tokens.setGateway(key.value.trim());
    history.push({ role: 'user', content: text });
    transcript.append(h('div', { class: 'msg user' }, text));
    prompt.value = '';
    const answer = h('div', { class: 'msg assistant', 'aria-busy': 'true' });
    transcript.append(answer);
    controller = new AbortController();
    send.disabled = true;
    stopButton.disabled = false;
    let reply = '';
    try {
      await streamChat({ model: model.value, messages: history, max_tokens: Number(maxTokens.value) || 256 },
        (token) => { reply += token; answer.textContent = reply; transcript.scrollTop = transcript.scrollHeight; },
        controller.signal);
      history.push({ role: 'assistant', content: reply });
      if (!reply) answer.textContent = '(empty answer)';
    } catch (err) {
      if (err.name === 'AbortError') {
        answer.textContent = `${reply} [stopped]`;
        history.push({ role: 'assistant', content: reply });
      } else {
        answer.remove();
        history.pop();
        transcript.append(h('div', { class: 'msg error', role: 'alert' }, `Error: ${errorText(err)}`));
      }
    } finally {
      answer.removeAttribute('aria-busy');
      send.disabled = false;
      stopButton.disabled = true;
      controller = null;
    }
  }

  async function loadModels() {
    let names = [];
    const status = new Map(); // model → status word, when the gateway says
    try {
      const listed = await gatewayModels();
      if (listed === null) {
        notice.textContent = 'This server has no OpenAI gateway (GET /v1/models is 404); the models below are its running services, and sending will fail.';
        const services = await api('/api/v1/modserv');
        names = [...new Set(services.filter((s) => s.status === 'running').map((s) => s.modelName))];
      } else {
        // Ready models first; the others stay choosable (a cold start may be queued).
        const ready = (m) => (m.status === undefined || m.status === 'running' ? 0 : 1);
        names = [...listed].sort((a, b) => ready(a) - ready(b)).map((m) => m.id);
        for (const m of listed) if (m.status) status.set(m.id, m.status);
        const running = listed.filter((m) => ready(m) === 0).length;
        notice.textContent = `${running} of ${listed.length} model(s) ready behind the gateway.`;
      }
    } catch (err) {
      notice.textContent = `Listing models failed: ${errorText(err)}${err.status === 401 ? ' — enter the gateway API key.' : ''}`;
    }
    const wanted = new URLSearchParams(location.hash.split('?')[1] || '').get('model');
    const keep = model.value;
    replace(model, names.length
      ? names.map((n) => h('option', { value: n, selected: n === (keep || wanted) },
        status.has(n) && status.get(n) !== 'running' ? `${n} (${status.get(n)})` : n))
      : h('option', { value: '' }, 'No model is being served'));
  }
  loadModels();

  return () => controller?.abort();
}
