// Calls to the shim's REST API and the OpenAI gateway. Tokens live in sessionStorage only and go
// in the Authorization header, never in a URL.

const TOKEN_KEY = 'xmod.operatorToken';
const GATEWAY_KEY = 'xmod.gatewayKey';

export class ApiError extends Error {
  constructor(status, message, data) {
    super(message);
    this.status = status;
    this.data = data;
  }
}

export const tokens = {
  operator: () => sessionStorage.getItem(TOKEN_KEY) || '',
  setOperator: (t) => (t ? sessionStorage.setItem(TOKEN_KEY, t) : sessionStorage.removeItem(TOKEN_KEY)),
  gateway: () => sessionStorage.getItem(GATEWAY_KEY) || '',
  setGateway: (t) => (t ? sessionStorage.setItem(GATEWAY_KEY, t) : sessionStorage.removeItem(GATEWAY_KEY)),
};

// Set by the app: shows the token dialog and resolves to true when a token was entered.
let askForToken = async () => false;
export function onTokenNeeded(fn) { askForToken = fn; }

/** A call to /api/v1: unwraps the envelope; on 401 asks for the operator token and retries once. */
export async function api(path, { method = 'GET', body, signal } = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const token = tokens.operator();
    if (token && method !== 'GET') headers.Authorization = `Bearer ${token}`;
    const response = await fetch(path, {
      method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
    });
    let envelope = null;
    try { envelope = await response.json(); } catch { /* not JSON: reported below */ }
    if (response.status === 401 && attempt === 0 && (await askForToken('The server refused the operator token, or none was given.'))) {
      continue;
    }
    if (!response.ok || !envelope || envelope.code !== 0) {
      const message = envelope?.message || `${method} ${path}: HTTP ${response.status}`;
      throw new ApiError(response.status, message, envelope?.data);
    }
    return envelope.data;
  }
}

/** Like `api`, but a 404 or 405 (a route this server does not have yet) is `null`. */
export async function optionalApi(path) {
  try {
    return await api(path);
  } catch (err) {
    if (err.status === 404 || err.status === 405) return null;
    throw err;
  }
}

function gatewayHeaders() {
  const headers = { 'Content-Type': 'application/json', Accept: 'application/json' };
  const key = tokens.gateway();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function gatewayError(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    message = body?.error?.message || body?.message || message;
  } catch { /* keep the status line */ }
  return new ApiError(response.status, message);
}

/** `GET /v1/models` of the gateway; `null` when the server has no gateway. */
export async function gatewayModels() {
  const response = await fetch('/v1/models', { headers: gatewayHeaders() });
  if (response.status === 404 || response.status === 405) return null;
  if (!response.ok) throw await gatewayError(response);
  return (await response.json()).data || [];
}

/**
 * A streamed chat completion: calls `onToken(text)` for every content delta and resolves when the
 * stream says [DONE] (or ends).
 */
export async function streamChat(body, onToken, signal) {
  const response = await fetch('/v1/chat/completions', {
    method: 'POST', headers: { ...gatewayHeaders(), Accept: 'text/event-stream' },
    body: JSON.stringify({ ...body, stream: true }), signal,
  });
  if (!response.ok) throw await gatewayError(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    // Server-sent events are separated by a blank line; keep an incomplete one for later.
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, '');
      const data = block.split(/\r?\n/).filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('\n');
      if (!data) continue;
      if (data === '[DONE]') { await reader.cancel(); return; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error.message || 'stream error');
      const text = chunk.choices?.[0]?.delta?.content;
      if (text) onToken(text);
    }
  }
}

/**
 * Follows a server-sent event stream with EventSource (reads need no token). Calls `onOpen` each
 * time it (re)connects, so the caller can re-read state it may have missed while disconnected.
 */
export function follow(path, { onEvent, onOpen, onLagged, onState }) {
  const source = new EventSource(path);
  source.onopen = () => { onState?.(true); onOpen?.(); };
  source.onerror = () => onState?.(source.readyState === EventSource.OPEN);
  source.onmessage = (message) => {
    let event;
    try { event = JSON.parse(message.data); } catch { return; }
    onEvent(event);
  };
  source.addEventListener('lagged', () => onLagged?.());
  return () => source.close();
}
