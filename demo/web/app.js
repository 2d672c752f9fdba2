// The demo page's behaviour: session state from GET /auth/me, API calls through the gateway.
// Cookie-authenticated calls carry `X-CSRF: 1` (the gateway refuses them without it). Every
// value from a server is shown with textContent, never parsed as HTML.
'use strict';

const JSON_HEADERS = { Accept: 'application/json' };
const CSRF_HEADERS = { ...JSON_HEADERS, 'X-CSRF': '1' };

const $ = (id) => document.getElementById(id);

async function request(path, options = {}) {
  const response = await fetch(path, { credentials: 'same-origin', cache: 'no-store', ...options });
  const text = await response.text();
  let body = text;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: show the text as it is
  }
  return { status: response.status, body };
}

function showLoggedIn(me) {
  const name = me.claims?.name ?? me.sub;
  const expires = new Date(me.session.expires_at * 1000).toLocaleString();
  $('status').textContent = `Logged in as ${name} (sub ${me.sub}). The session ends at the latest on ${expires}.`;
}

async function refreshSession() {
  let loggedIn = false;
  try {
    const { status, body } = await request('/auth/me', { headers: JSON_HEADERS });
    loggedIn = status === 200;
    if (loggedIn) showLoggedIn(body);
    else $('status').textContent = 'Not logged in. Log in, then call the APIs.';
  } catch (err) {
    $('status').textContent = `The gateway did not answer: ${err.message}`;
  }
  $('login').hidden = loggedIn;
  $('logout').hidden = !loggedIn;
  document.body.dataset.session = loggedIn ? 'in' : 'out';
}

function verdictFor(status, body) {
  if (status === 200 && body && typeof body === 'object') {
    const aud = Array.isArray(body.aud) ? body.aud.join(', ') : body.aud;
    return { ok: true, text: `HTTP 200: the ${body.api} API saw aud ${aud}` };
  }
  const error = body && typeof body === 'object' && body.error ? body.error : 'error';
  if (status === 401) return { ok: false, text: `HTTP 401 ${error}: log in first` };
  if (status === 403) return { ok: false, text: `HTTP 403 ${error}: refused by the gateway` };
  return { ok: false, text: `HTTP ${status} ${error}` };
}

async function callApi(button) {
  const api = button.dataset.api;
  const verdict = $(`verdict-${api}`);
  const result = $(`result-${api}`);
  button.disabled = true;
  verdict.className = 'verdict';
  verdict.textContent = 'Calling…';
  result.textContent = '';
  try {
    const { status, body } = await request(button.dataset.path, { headers: CSRF_HEADERS });
    const { ok, text } = verdictFor(status, body);
    verdict.className = `verdict ${ok ? 'ok' : 'refused'}`;
    verdict.textContent = text;
    result.textContent = typeof body === 'string' ? body : JSON.stringify(body, null, 2);
    if (status === 401) await refreshSession();
  } catch (err) {
    verdict.className = 'verdict refused';
    verdict.textContent = `The gateway did not answer: ${err.message}`;
  } finally {
    button.disabled = false;
  }
}

async function logout() {
  const { status, body } = await request('/auth/logout', { method: 'POST', headers: CSRF_HEADERS });
  // Then log out at the IdP too (RP-initiated logout); it sends the browser back here.
  const next = status === 200 && typeof body.logout_url === 'string' ? body.logout_url : '/';
  window.location.assign(/^(https?:\/\/|\/(?!\/))/.test(next) ? next : '/');
}

document.addEventListener('DOMContentLoaded', () => {
  for (const button of document.querySelectorAll('button[data-api]')) {
    button.addEventListener('click', () => callApi(button));
  }
  $('logout').addEventListener('click', logout);
  refreshSession();
});
