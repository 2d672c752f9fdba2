// Benchmark peer: the BFF Auth0 documents for Node.js, as small as its docs make it.
//
//   express + express-openid-connect (login, callback, the session) + http-proxy-middleware
//   (the proxy), and per route an access token for the route's audience, obtained with the
//   refresh token (`req.oidc.accessToken.refresh({ tokenEndpointParams: { audience } })`) and
//   kept until `isExpired()` says so, as the SDK's examples show.
//
// What was done to help it (benchmarks/README.md, "Peers"):
// - a server-side session store (a Map in this process, the store interface the SDK documents)
//   instead of the default encrypted cookie: wrk replays one cookie, so a cookie session would
//   refresh on every request, and a browser's parallel requests would race on it too;
// - the SDK keeps one access token per session (refresh() replaces it), so the per-audience
//   tokens live in the session beside it, each kept until it expires (no early refresh, like
//   the SDK's isExpired());
// - the proxy keeps upstream connections alive (an http.Agent with keepAlive), logging is off.
//
// Configuration (environment): PORT, ISSUER, CLIENT_ID, CLIENT_SECRET, SECRET (cookie signing),
// UPSTREAM (base URL), ROUTES (JSON: [{"prefix": "/api", "audience": "...", "scope": "..."}]),
// LOGIN_AUDIENCE. Prints {"port": N} on stdout when listening.
'use strict';

const http = require('node:http');

const express = require('express');
const { auth, requiresAuth } = require('express-openid-connect');
const { createProxyMiddleware } = require('http-proxy-middleware');

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is required`);
  return value;
};

const PORT = Number.parseInt(process.env.PORT || '0', 10);
const ROUTES = JSON.parse(env('ROUTES'));
const UPSTREAM = env('UPSTREAM');

// A session store with the interface express-openid-connect takes (express-session's).
class MapStore {
  constructor() {
    this.sessions = new Map();
  }

  get(id, callback) {
    callback(null, this.sessions.get(id));
  }

  set(id, value, callback) {
    this.sessions.set(id, value);
    callback(null);
  }

  destroy(id, callback) {
    this.sessions.delete(id);
    callback(null);
  }
}

const app = express();
app.disable('x-powered-by');
app.disable('etag');

const scopes = ['openid', 'profile', 'email', 'offline_access', ...ROUTES.map((r) => r.scope)];
app.use(
  auth({
    authRequired: false,
    issuerBaseURL: env('ISSUER'),
    baseURL: `http://127.0.0.1:${PORT}`,
    clientID: env('CLIENT_ID'),
    clientSecret: env('CLIENT_SECRET'),
    clientAuthMethod: 'client_secret_post',
    secret: env('SECRET'),
    idpLogout: false,
    authorizationParams: {
      response_type: 'code',
      audience: env('LOGIN_AUDIENCE'),
      scope: scopes.join(' '),
      prompt: 'consent',
    },
    routes: { login: '/auth/login', callback: '/auth/callback', logout: '/auth/logout' },
    session: { store: new MapStore() },
    // The login's access token is the login audience's: keep it as that audience's token.
    afterCallback: (_req, _res, session) => ({
      ...session,
      tokens: {
        [process.env.LOGIN_AUDIENCE]: {
          access_token: session.access_token,
          expires_at: session.expires_at,
        },
      },
    }),
  }),
);

const epoch = () => Math.floor(Date.now() / 1000);

// The access token for `audience`: the session's while it has not expired, else a refresh.
async function accessTokenFor(req, audience) {
  const tokens = (req.appSession.tokens ??= {});
  const held = tokens[audience];
  if (held && held.expires_at > epoch()) return held.access_token;
  const { access_token, expires_in } = await req.oidc.accessToken.refresh({
    tokenEndpointParams: { audience },
  });
  tokens[audience] = { access_token, expires_at: epoch() + expires_in };
  return access_token;
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });

for (const route of ROUTES) {
  const proxy = createProxyMiddleware({
    target: UPSTREAM,
    agent,
    changeOrigin: true,
    xfwd: true,
    logger: undefined,
    on: {
      proxyReq: (proxyReq, req) => {
        proxyReq.setHeader('authorization', `Bearer ${req.bffAccessToken}`);
        proxyReq.removeHeader('cookie');
      },
      error: (_err, _req, res) => {
        if (!res.headersSent) res.writeHead(502, { 'content-type': 'application/json' });
        res.end('{"error":"upstream_unavailable"}');
      },
    },
  });
  app.use(route.prefix, requiresAuth(), async (req, res, next) => {
    try {
      req.bffAccessToken = await accessTokenFor(req, route.audience);
    } catch (err) {
      res.status(401).json({ error: 'login_required', detail: String(err?.message ?? err) });
      return;
    }
    proxy(req, res, next);
  });
}

const server = app.listen(PORT, '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ port: server.address().port })}\n`);
});
server.keepAliveTimeout = 65_000;
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
