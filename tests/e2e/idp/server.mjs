// Local OpenID Provider for the mrrt-gateway end-to-end tests.
//
// Built on `oidc-provider` 9.13.3 (see package.json). It emulates the parts of
// Auth0's Multi-Resource Refresh Token (MRRT) behaviour the gateway relies on,
// using RFC 8707 resource indicators: the client logs in once for several APIs
// and then refreshes with `resource=<one API>` to get a single-audience JWT.
//
// Listens on 127.0.0.1 on an ephemeral port by default. The issuer is
// `http://<host>:<port>`. When ready, exactly one JSON line is written to
// stdout: {"issuer": "...", "port": N}. Every log line goes to stderr.
//
// Environment variables:
//   IDP_PORT             port to listen on (default 0: ephemeral); the demo uses 4000
//   IDP_HOST             address to listen on and to name in the issuer (default
//                        127.0.0.1); browsers must reach it, so no 0.0.0.0
//   IDP_AT_TTL           access token lifetime in seconds (default 60)
//   IDP_ROTATE           "1" rotates refresh tokens on every use; replaying a
//                        rotated token is `invalid_grant` and revokes the grant
//                        (default "0": refresh tokens never rotate)
//   IDP_BACKCHANNEL_URI  back-channel logout URI registered for both clients
//                        (default: none, so no back-channel logout)
//   IDP_EXIT_ON_STDIN_EOF  "1" exits when stdin closes, so the IdP dies with
//                        the test process that spawned it (default "0")
//   IDP_PKJWT_JWKS       a public JWKS (JSON): registers the client `bff-pkjwt`
//                        (below) and turns on pushed authorization requests and
//                        DPoP nonces for every DPoP proof (default: none of it)
//   IDP_TLS_CERT, IDP_TLS_KEY  PEM files: serve https and name an https issuer
//                        (for SDKs that refuse http issuers; the benchmark's peers)
//   IDP_AUDIENCE_PARAM   "1" also speaks Auth0's dialect: `audience` stands for
//                        `resource` at /token, and at /auth it asks for every API
//                        of the MRRT policy, the named one first (default "0")
//
// Clients (confidential, grant types authorization_code + refresh_token +
// client_credentials; a client-credentials token is a JWT for one `resource`):
//   bff        / bff-secret        token_endpoint_auth_method client_secret_post
//   bff-basic  / bff-basic-secret  token_endpoint_auth_method client_secret_basic
//   bff-pkjwt  (no secret)         private_key_jwt with IDP_PKJWT_JWKS; DPoP-bound
//                                  access tokens required (nonces required);
//                                  pushed authorization requests required
// All accept any redirect_uri `http://{127.0.0.1|localhost}:<port>/auth/callback`
// and any post_logout_redirect_uri `http://{127.0.0.1|localhost}:<port>/<path>`.
//
// Resource servers (JWT access tokens, RS256, aud = the resource):
//   https://api.example.com      read:orders write:orders   (in the MRRT policy)
//   https://billing.example.com  read:invoices              (in the MRRT policy)
//   https://outside.example.com  read:secrets               (known, NOT in the policy)
// `resource` values outside the policy are silently dropped at /auth (as Auth0
// ignores audiences outside its policy), so a later refresh for them gets
// `invalid_target`. A code or refresh exchange without `resource` gets a token
// for the first granted resource in policy order (Auth0's "default audience").
//
// Test-only endpoints (outside the OIDC routes):
//   GET  /__health        200 {"ok": true}
//   GET  /__stats         counters, see `newStats()`
//   POST /__stats/reset   zeroes the counters
//   POST /__dpop/rotate   a new DPoP nonce secret: every nonce issued so far is
//                         refused from now on (`use_dpop_nonce` with a new one)
//
// Dev interactions are on: any login/password is accepted and the login
// becomes `sub`; consent grants every requested scope and resource.
//
// Authentication strength (for step-up): the password `mfa` logs in with
// acr `urn:test:mfa` (amr ["pwd", "otp"]), any other with acr `urn:test:pwd`
// (amr ["pwd"]). The claims parameter is on, so a login asking for an
// essential acr the IdP session lacks prompts for a new login; max_age does
// too, and puts auth_time in the ID token.
//
// Claims beyond the standard ones (scope `profile`), for claim rules:
//   https://example.com/roles  ["admin", "staff"] for a login starting with
//                              "admin", else ["staff"]
//   groups                     ["ops"] for "admin...", else ["dev"]
//   app_metadata               {"plan": "pro" when the login contains "pro",
//                               else "free", "beta": true}

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { setDefaultResultOrder } from 'node:dns';
import { readFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';

import Provider, { errors } from 'oidc-provider';
import ServerChallenge from 'oidc-provider/lib/helpers/challenge.js';
import instance from 'oidc-provider/lib/helpers/weak_cache.js';

// oidc-provider prints its notices with console.info (stdout); keep stdout for
// the single ready line only.
console.info = (...args) => console.error(...args);
console.log = (...args) => console.error(...args);

// Each startup stage is logged with its time, so a start that stalls says where.
const startedAt = Date.now();
const stage = (name) => console.error(`startup: ${name} after ${Date.now() - startedAt} ms`);
stage('modules loaded');

// Back-channel delivery to `localhost` must hit the IPv4 loopback the gateway
// listens on.
setDefaultResultOrder('ipv4first');

const AT_TTL = Number.parseInt(process.env.IDP_AT_TTL ?? '60', 10);
if (!Number.isInteger(AT_TTL) || AT_TTL <= 0) {
  throw new Error(`IDP_AT_TTL must be a positive integer, got ${process.env.IDP_AT_TTL}`);
}
const PORT = Number.parseInt(process.env.IDP_PORT || '0', 10);
if (!Number.isInteger(PORT) || PORT < 0 || PORT > 65535) {
  throw new Error(`IDP_PORT must be a port number (0 = ephemeral), got ${process.env.IDP_PORT}`);
}
const HOST = process.env.IDP_HOST || '127.0.0.1';
const ROTATE = process.env.IDP_ROTATE === '1';
const BACKCHANNEL_URI = process.env.IDP_BACKCHANNEL_URI || undefined;
const PKJWT_JWKS = process.env.IDP_PKJWT_JWKS ? JSON.parse(process.env.IDP_PKJWT_JWKS) : undefined;
const TLS = process.env.IDP_TLS_CERT
  ? { cert: readFileSync(process.env.IDP_TLS_CERT), key: readFileSync(process.env.IDP_TLS_KEY) }
  : undefined;
const AUDIENCE_PARAM = process.env.IDP_AUDIENCE_PARAM === '1';

const RESOURCE_SERVERS = {
  'https://api.example.com': 'read:orders write:orders',
  'https://billing.example.com': 'read:invoices',
  'https://outside.example.com': 'read:secrets',
};
// The client's "MRRT policy": the APIs it may obtain tokens for.
const POLICY = ['https://api.example.com', 'https://billing.example.com'];

const LOOPBACK_REDIRECT = /^http:\/\/(127\.0\.0\.1|localhost):\d{1,5}\/auth\/callback$/;
const LOOPBACK_POST_LOGOUT = /^http:\/\/(127\.0\.0\.1|localhost):\d{1,5}\/[^#\s]*$/;

// ---------------------------------------------------------------- counters --

function newStats() {
  return {
    grants: { authorization_code: 0, refresh_token: 0 },
    refresh_by_resource: {},
    client_credentials_by_resource: {},
    refresh_errors: {},
    grant_errors: {},
    revocations: 0,
    grants_revoked: 0,
    dropped_resources: {},
    end_sessions: 0,
    backchannel: { success: 0, error: 0 },
    pushed_authorization_requests: 0,
    dpop_proofs: 0,
    dpop_nonce_rotations: 0,
  };
}

let stats = newStats();

function bump(obj, key) {
  obj[key] = (obj[key] ?? 0) + 1;
}

// ----------------------------------------------------------------- storage --

const GRANTABLE = new Set([
  'AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode',
  'BackchannelAuthenticationRequest', 'PreAuthorizedCode',
]);

// Unbounded Map store with per-entry expiry (the built-in adapter is an LRU
// capped at 1000 entries, which load tests overflow).
const store = new Map();

function storeGet(key) {
  const entry = store.get(key);
  if (entry === undefined) return undefined;
  if (entry.expiresAt !== undefined && entry.expiresAt <= Date.now()) {
    store.delete(key);
    return undefined;
  }
  return entry.value;
}

function storeSet(key, value, expiresIn) {
  const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : undefined;
  store.set(key, { value, expiresAt });
}

const sweeper = setInterval(() => {
  const now = Date.now();
  for (const [key, entry] of store) {
    if (entry.expiresAt !== undefined && entry.expiresAt <= now) store.delete(key);
  }
  for (const [key, entry] of store) {
    if (key.startsWith('grant:')) {
      for (const member of entry.value) if (!store.has(member)) entry.value.delete(member);
      if (entry.value.size === 0) store.delete(key);
    }
  }
}, 30_000);
sweeper.unref();

class MapAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    if (this.model === 'Session') storeSet(`sessionUid:${payload.uid}`, id, expiresIn);
    if (payload.userCode) storeSet(`userCode:${payload.userCode}`, id, expiresIn);
    if (GRANTABLE.has(this.model) && payload.grantId) {
      const grantKey = `grant:${payload.grantId}`;
      const members = storeGet(grantKey) ?? new Set();
      members.add(key);
      storeSet(grantKey, members);
    }
    storeSet(key, { ...payload }, expiresIn);
  }

  async find(id) {
    return storeGet(this.key(id));
  }

  async findByUid(uid) {
    const id = storeGet(`sessionUid:${uid}`);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = storeGet(`userCode:${userCode}`);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const payload = storeGet(this.key(id));
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    const grantKey = `grant:${grantId}`;
    for (const member of storeGet(grantKey) ?? []) store.delete(member);
    store.delete(grantKey);
  }
}

// ---------------------------------------------------------------- provider --

function signingKeys() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { keys: [{ ...jwk, kid: `rs256-${randomBytes(6).toString('hex')}`, alg: 'RS256', use: 'sig' }] };
}

function clientMetadata(clientId, secret, authMethod) {
  return {
    client_id: clientId,
    client_secret: secret,
    token_endpoint_auth_method: authMethod,
    grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
    response_types: ['code'],
    // Placeholders: the real check is the loopback pattern installed below.
    redirect_uris: ['http://127.0.0.1/auth/callback'],
    post_logout_redirect_uris: ['http://127.0.0.1/'],
    ...(BACKCHANNEL_URI
      ? { backchannel_logout_uri: BACKCHANNEL_URI, backchannel_logout_session_required: true }
      : {}),
  };
}

const ROLES_CLAIM = 'https://example.com/roles';
const ACR_PWD = 'urn:test:pwd';
const ACR_MFA = 'urn:test:mfa';

function account(sub) {
  const admin = sub.startsWith('admin');
  return {
    accountId: sub,
    async claims() {
      return {
        sub,
        email: `${sub}@example.com`,
        email_verified: true,
        name: `${sub.charAt(0).toUpperCase()}${sub.slice(1)} Example`,
        [ROLES_CLAIM]: admin ? ['admin', 'staff'] : ['staff'],
        groups: admin ? ['ops'] : ['dev'],
        app_metadata: { plan: sub.includes('pro') ? 'pro' : 'free', beta: true },
      };
    },
  };
}

function pkjwtClient() {
  const { client_secret: _none, ...metadata } = clientMetadata('bff-pkjwt', undefined, 'private_key_jwt');
  return {
    ...metadata,
    jwks: PKJWT_JWKS,
    dpop_bound_access_tokens: true,
    require_pushed_authorization_requests: true,
  };
}

function buildProvider(issuer) {
  const provider = new Provider(issuer, {
    adapter: MapAdapter,
    clients: [
      clientMetadata('bff', 'bff-secret', 'client_secret_post'),
      clientMetadata('bff-basic', 'bff-basic-secret', 'client_secret_basic'),
      ...(PKJWT_JWKS ? [pkjwtClient()] : []),
    ],
    jwks: signingKeys(),
    cookies: { keys: [randomBytes(32).toString('hex')] },
    acrValues: [ACR_PWD, ACR_MFA],
    claims: {
      acr: null,
      auth_time: null,
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', ROLES_CLAIM, 'groups', 'app_metadata'],
    },
    findAccount: async (_ctx, sub) => account(sub),
    allowOmittingSingleRegisteredRedirectUri: false,
    // ID tokens carry the email/profile claims too (as Auth0's do).
    conformIdTokenClaims: false,
    discovery: {
      resource_indicators_supported: true,
      resource_servers: Object.keys(RESOURCE_SERVERS),
    },
    features: {
      devInteractions: { enabled: true },
      claimsParameter: { enabled: true },
      clientCredentials: { enabled: true },
      revocation: { enabled: true },
      rpInitiatedLogout: { enabled: true },
      backchannelLogout: { enabled: true },
      pushedAuthorizationRequests: { enabled: Boolean(PKJWT_JWKS) },
      dPoP: PKJWT_JWKS
        ? { enabled: true, nonceSecret: randomBytes(32), requireNonce: () => true }
        : { enabled: true },
      resourceIndicators: {
        enabled: true,
        useGrantedResource: async () => true,
        defaultResource: async (_ctx, _client, oneOf) => {
          if (!Array.isArray(oneOf)) return oneOf;
          return POLICY.find((r) => oneOf.includes(r)) ?? oneOf[0];
        },
        getResourceServerInfo: async (_ctx, resource) => {
          const scope = RESOURCE_SERVERS[resource];
          if (scope === undefined) throw new errors.InvalidTarget();
          return {
            scope,
            audience: resource,
            accessTokenTTL: AT_TTL,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
    rotateRefreshToken: ROTATE,
    // Deliver back-channel logout to loopback: skip the SSRF-guarding dispatcher.
    fetch: (url, options) => {
      const { dispatcher: _unused, ...rest } = options;
      return globalThis.fetch(url, rest);
    },
    ttl: {
      AccessToken: AT_TTL,
      AuthorizationCode: 60,
      IdToken: 3600,
      Interaction: 3600,
      RefreshToken: 14 * 24 * 3600,
      Session: 14 * 24 * 3600,
      Grant: 14 * 24 * 3600,
    },
    renderError: async (ctx, out) => {
      ctx.type = 'json';
      ctx.body = out;
    },
  });

  // The dev login form has no second factor: its password picks the acr (see above).
  const finish = provider.interactionFinished.bind(provider);
  provider.interactionFinished = async (req, res, result, options) => {
    if (result?.login) {
      const password = Provider.ctx?.oidc?.body?.password;
      const strong = password === 'mfa';
      result.login.acr = strong ? ACR_MFA : ACR_PWD;
      result.login.amr = strong ? ['pwd', 'otp'] : ['pwd'];
    }
    return finish(req, res, result, options);
  };

  provider.Client.prototype.redirectUriAllowed = function redirectUriAllowed(value) {
    return typeof value === 'string' && LOOPBACK_REDIRECT.test(value);
  };
  // Like Auth0, always put `sid` in ID tokens (oidc-provider only does it for
  // clients registered with backchannel_logout_session_required).
  provider.Client.prototype.includeSid = () => true;
  provider.Client.prototype.postLogoutRedirectUriAllowed = function postLogoutAllowed(value) {
    return typeof value === 'string' && LOOPBACK_POST_LOGOUT.test(value);
  };

  // Auth0's dialect (IDP_AUDIENCE_PARAM): its `audience` is RFC 8707's `resource`. A login
  // for one audience yields a refresh token for the whole MRRT policy, as at Auth0.
  if (AUDIENCE_PARAM) {
    provider.use(async (ctx, next) => {
      if (ctx.method === 'GET' && ctx.path === '/auth') {
        const params = new URLSearchParams(ctx.querystring);
        const audience = params.get('audience');
        if (audience && !params.has('resource')) {
          for (const r of [audience, ...POLICY.filter((p) => p !== audience)]) {
            params.append('resource', r);
          }
        }
        params.delete('audience');
        ctx.querystring = params.toString();
      } else if (ctx.method === 'POST' && ctx.path === '/token' && ctx.is('application/x-www-form-urlencoded')) {
        const chunks = [];
        for await (const chunk of ctx.req) chunks.push(chunk);
        const params = new URLSearchParams(Buffer.concat(chunks).toString());
        if (params.has('audience') && !params.has('resource')) {
          params.set('resource', params.get('audience'));
        }
        params.delete('audience');
        ctx.req.body = params.toString(); // oidc-provider reads an already-read body from here
      }
      await next();
    });
  }

  // MRRT policy: drop `resource` values outside the policy from /auth.
  provider.use(async (ctx, next) => {
    if (ctx.method === 'GET' && ctx.path === '/auth') {
      const params = new URLSearchParams(ctx.querystring);
      const requested = params.getAll('resource');
      const dropped = requested.filter((r) => !POLICY.includes(r));
      if (dropped.length) {
        params.delete('resource');
        for (const r of requested) if (POLICY.includes(r)) params.append('resource', r);
        for (const r of dropped) bump(stats.dropped_resources, r);
        ctx.querystring = params.toString();
      }
    }
    await next();
    if (ctx.method === 'POST' && ctx.path === '/token/revocation' && ctx.status === 200) {
      stats.revocations += 1;
    }
  });

  provider.on('grant.success', (ctx) => {
    const { grant_type: grantType, resource } = ctx.oidc.params;
    bump(stats.grants, grantType);
    if (grantType === 'refresh_token') {
      const at = ctx.oidc.entities.AccessToken;
      const key = resource ?? at?.resourceServer?.identifier() ?? '';
      bump(stats.refresh_by_resource, key);
    }
    if (grantType === 'client_credentials') bump(stats.client_credentials_by_resource, resource ?? '');
  });
  provider.on('grant.error', (ctx, err) => {
    const grantType = ctx.oidc?.params?.grant_type ?? 'unknown';
    const code = err?.error ?? 'server_error';
    stats.grant_errors[grantType] ??= {};
    bump(stats.grant_errors[grantType], code);
    if (grantType === 'refresh_token') bump(stats.refresh_errors, code);
  });
  provider.on('grant.revoked', () => { stats.grants_revoked += 1; });
  provider.on('pushed_authorization_request.success', () => {
    stats.pushed_authorization_requests += 1;
  });
  provider.on('end_session.success', () => { stats.end_sessions += 1; });
  provider.on('backchannel.success', () => { stats.backchannel.success += 1; });
  provider.on('backchannel.error', (_ctx, err, clientId) => {
    stats.backchannel.error += 1;
    console.error(`backchannel logout to ${clientId} failed: ${err?.message ?? err}`);
  });
  provider.on('server_error', (ctx, err) => {
    console.error(`server_error ${ctx.method} ${ctx.path}:`, err);
  });
  return provider;
}

// ------------------------------------------------------------------ server --

function sendJson(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) });
  res.end(data);
}

let handler = (_req, res) => sendJson(res, 503, { error: 'starting' });
let currentProvider;

const onRequest = (req, res) => {
  const path = (req.url ?? '/').split('?')[0];
  if (path === '/__health' && req.method === 'GET') return sendJson(res, 200, { ok: true });
  if (path === '/__stats' && req.method === 'GET') return sendJson(res, 200, stats);
  if (path === '/__dpop/rotate' && req.method === 'POST' && currentProvider) {
    instance(currentProvider).DPoPNonces = new ServerChallenge(randomBytes(32), 'DPoP');
    stats.dpop_nonce_rotations += 1;
    return sendJson(res, 200, { rotated: true });
  }
  if (path === '/__stats/reset' && req.method === 'POST') {
    stats = newStats();
    return sendJson(res, 200, stats);
  }
  return handler(req, res);
};
const server = TLS ? createHttpsServer(TLS, onRequest) : createHttpServer(onRequest);
server.keepAliveTimeout = 5_000;

server.on('error', (err) => {
  console.error(`cannot listen on ${HOST}:${PORT}: ${err.message}`);
  process.exit(1);
});

server.listen(PORT, HOST, () => {
  stage('listening');
  const { port } = server.address();
  const issuer = `${TLS ? 'https' : 'http'}://${HOST.includes(':') ? `[${HOST}]` : HOST}:${port}`;
  const provider = buildProvider(issuer);
  currentProvider = provider;
  handler = provider.callback();
  stage('provider built');
  process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
});

let stopping = false;
function shutdown() {
  if (stopping) return;
  stopping = true;
  clearInterval(sweeper);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2_000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
if (process.env.IDP_EXIT_ON_STDIN_EOF === '1') {
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}
