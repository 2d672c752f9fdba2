"""Configuration: a YAML file, then ``GATEWAY_*`` environment variables (``__`` nests).

Everything is validated at startup so that a wrong route or a missing secret is an exit with a
message naming the field, never a runtime surprise.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from . import own_paths
from .errors import ConfigError
from .headers import check_forwardable_identity_header

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``500ms``, ``30s``, ``5m``, ``8h``, ``7d`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 8h or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"invalid duration {value!r}: use e.g. 500ms, 30s, 5m, 8h, 7d")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _absolute_http_url(value: str, *, field: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{field} must be an absolute http(s) URL, got {value!r}")
    if parts.fragment:
        raise ValueError(f"{field} must not have a fragment")
    return value


def _path_prefix(value: str, *, example: str) -> str:
    """A plain absolute path prefix, normalised to end with ``/``."""
    if not value.startswith("/") or any(c in value for c in "?#\\%") or "//" in value:
        raise ValueError(f"must be an absolute path like {example}, got {value!r}")
    if any(seg in (".", "..") for seg in value.split("/")):
        raise ValueError("must not contain . or .. segments")
    return value if value.endswith("/") else value + "/"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", description="Address uvicorn binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port uvicorn binds to.")
    graceful_timeout: Duration = Field(
        20.0, description="How long in-flight requests may run on shutdown."
    )


ClientAuthMethod = Literal["client_secret_post", "client_secret_basic", "private_key_jwt", "none"]


class OIDCSettings(_Section):
    issuer: str = Field(description="The OpenID Provider's issuer URL (discovery is fetched).")
    client_id: str = Field(min_length=1, description="The gateway's client id at the IdP.")
    client_secret: SecretStr | None = Field(
        None, description="Set with GATEWAY_OIDC__CLIENT_SECRET, never in the file."
    )
    client_auth: ClientAuthMethod = Field(
        "client_secret_post",
        # The setting's former name is still read (one setting, two spellings).
        validation_alias=AliasChoices("client_auth", "token_endpoint_auth_method"),
        description="How the gateway authenticates to the IdP (token, revocation, PAR): "
        "client_secret_post | client_secret_basic | private_key_jwt | none (a public "
        "client). Formerly token_endpoint_auth_method.",
    )
    private_key: SecretStr | None = Field(
        None,
        description="private_key_jwt: PEM private key(s) from GATEWAY_OIDC__PRIVATE_KEY, never "
        "in the file; several rotate (the first signs).",
    )
    private_key_file: Path | None = Field(
        None, description="private_key_jwt: a PEM file of one or several private keys."
    )
    private_key_alg: Literal["RS256", "PS256", "ES256"] | None = Field(
        None, description="private_key_jwt: RS256 (default) or PS256 for RSA keys; ES256 (P-256)."
    )
    client_assertion_audience: str | None = Field(
        None,
        description="private_key_jwt: the assertion's aud (default: the issuer with the auth0 "
        "dialect, the token endpoint URL otherwise).",
    )
    par: Literal["auto", "required", "off"] = Field(
        "auto",
        description="Pushed authorization requests (RFC 9126): auto uses them when discovery "
        "lists pushed_authorization_request_endpoint; required refuses an IdP without one.",
    )
    dialect: Literal["auth0", "rfc8707"] = Field(
        "auth0", description="auth0 sends `audience`; rfc8707 sends `resource`."
    )
    scopes: list[str] = Field(
        default_factory=lambda: ["openid", "profile", "email", "offline_access"],
        description="Scopes requested at login; openid and offline_access are required.",
    )
    login_audience: str | None = Field(
        None, description="Audience requested at login (auth0 dialect)."
    )
    prompt: str | None = Field(
        None, description="`prompt` sent at login (oidc-provider needs `consent` for refresh)."
    )
    extra_authorize_params: dict[str, str] = Field(
        default_factory=dict, description="Extra query parameters for the authorize request."
    )
    post_logout_redirect_url: str | None = Field(
        None, description="Where the IdP sends the user after logout (default public_url + /)."
    )
    userinfo: bool = Field(
        False,
        description="At login, also read the userinfo endpoint; its claims join the ID token's "
        "for `require:` rules (the ID token's win where both name a claim).",
    )
    organization: str | None = Field(
        None,
        description="Auth0 Organizations: the organization (id `org_...` or name) every login "
        "asks for; the ID token's org_id (or org_name) must match.",
    )
    organizations: list[str] = Field(
        default_factory=list,
        description="Organizations a login may choose with /auth/login?organization=...; a "
        "login that names none asks for `organization` if set, else for none, and then the ID "
        "token must name one of these. An `org_...` value is an id, anything else a name.",
    )
    mfa_acr_value: str = Field(
        "http://schemas.openid.net/pape/policies/2007/06/multi-factor",
        description="The acr_values a login asks for when the IdP refuses a refresh with "
        "`mfa_required` (Auth0's multi-factor policy by default).",
    )
    http_timeout: Duration = Field(10.0, description="Timeout of every call to the IdP.")
    clock_leeway: Duration = Field(30.0, description="Leeway for ID-token iat/exp checks.")

    @field_validator("issuer")
    @classmethod
    def _issuer_is_url(cls, value: str) -> str:
        return _absolute_http_url(value, field="issuer")

    @field_validator("scopes")
    @classmethod
    def _scopes_have_openid(cls, value: list[str]) -> list[str]:
        if "openid" not in value:
            raise ValueError("must contain openid")
        if "offline_access" not in value:
            raise ValueError("must contain offline_access (the gateway needs a refresh token)")
        return value

    @field_validator("organizations")
    @classmethod
    def _organizations_are_names(cls, value: list[str]) -> list[str]:
        for org in value:
            check_organization(org)
        return value

    @field_validator("organization")
    @classmethod
    def _organization_is_name(cls, value: str | None) -> str | None:
        return None if value is None else check_organization(value)

    @property
    def allowed_organizations(self) -> list[str]:
        """Every organization a login may ask for (``organization`` first)."""
        orgs = [self.organization] if self.organization else []
        return orgs + [o for o in self.organizations if o not in orgs]


_ORGANIZATION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_ACR_VALUE = re.compile(r"^[\x21-\x7e]{1,256}$")  # printable ASCII without spaces


def check_organization(value: str) -> str:
    """An Auth0 organization id (``org_...``) or name: letters, digits, ``_.-``."""
    if not _ORGANIZATION.match(value):
        raise ValueError(f"not an organization id or name: {value[:70]!r}")
    return value


def check_acr_value(value: str) -> str:
    """One ``acr`` value (a URI or a short name): printable ASCII, no spaces."""
    if not _ACR_VALUE.match(value):
        raise ValueError(f"not an acr value (printable ASCII without spaces): {value[:70]!r}")
    return value


class SessionSettings(_Section):
    store: Literal["memory", "redis"] = Field("memory", description="Where sessions live.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL.")
    redis_key_prefix: str = Field("gw:", description="Prefix of every Redis key.")
    redis_pool_size: int = Field(50, ge=1, description="Redis connection pool size.")
    redis_timeout: Duration = Field(2.0, description="Timeout of one Redis command.")
    redis_mode: Literal["standalone", "sentinel", "cluster"] = Field(
        "standalone",
        description="standalone: redis_url names the server. sentinel: redis_sentinels find "
        "the master redis_sentinel_master (redis_url gives scheme, user, password, db). "
        "cluster: redis_url and redis_cluster_nodes are seed nodes.",
    )
    # NoDecode: the env var is a comma-separated list, not JSON.
    redis_sentinels: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Sentinel addresses, host:port (sentinel mode)."
    )
    redis_sentinel_master: str = Field("mymaster", description="Master name (sentinel mode).")
    redis_sentinel_username: str | None = Field(
        None, description="ACL user of the sentinels themselves (if they require one)."
    )
    redis_sentinel_password: SecretStr | None = Field(
        None, description="GATEWAY_SESSION__REDIS_SENTINEL_PASSWORD: the sentinels' password."
    )
    redis_cluster_nodes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="More cluster seed nodes, host:port, besides redis_url's (cluster mode).",
    )
    redis_cache_size: int = Field(
        100_000,
        ge=0,
        description="Sessions and token sets each instance keeps decoded, kept coherent by "
        "Redis client tracking (a hit costs no round trip); 0 turns the cache off.",
    )
    redis_cache_lease: Duration = Field(
        1.0,
        gt=0,
        description="A cache hit is served only while the invalidation connection answered a "
        "PING sent less than this long ago: the bound on staleness if that connection is cut "
        "off silently (a partition).",
    )
    cookie_name: str = Field(
        "gw_session",
        pattern=r"^[A-Za-z0-9_\-]+$",
        description="Session cookie name; `__Host-` is prepended on https.",
    )
    cookie_samesite: Literal["lax", "strict"] = Field("lax", description="SameSite attribute.")
    idle_timeout: Duration = Field(8 * 3600.0, gt=0, description="Session ends after this idle.")
    absolute_timeout: Duration = Field(
        7 * 86400.0, gt=0, description="Session ends this long after login, whatever happens."
    )
    max_pending_logins: int = Field(
        10_000,
        ge=1,
        description="Logins started and not yet finished (each kept up to 10 minutes, at most "
        "~3 KB): past this, /auth/login answers 503 too_many_pending_logins. With Redis the "
        "bound holds across every instance.",
    )
    max_per_user: int = Field(
        0,
        ge=0,
        description="Sessions one user (`sub`) may hold at once: the login that would pass it "
        "ends the user's oldest sessions (refresh tokens revoked). 0 = no limit.",
    )
    # NoDecode: the env var is a comma-separated list, not JSON.
    secret_key: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="GATEWAY_SESSION__SECRET_KEY: signs cookies and encrypts sessions at rest; "
        "a comma-separated list rotates keys (first one writes).",
    )

    @field_validator("secret_key", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str | SecretStr):
            raw = value.get_secret_value() if isinstance(value, SecretStr) else value
            return [k.strip() for k in raw.split(",") if k.strip()]
        return value

    @field_validator("secret_key")
    @classmethod
    def _keys_long_enough(cls, value: list[SecretStr]) -> list[SecretStr]:
        for key in value:
            if len(key.get_secret_value()) < 32:
                raise ValueError("each key must be at least 32 characters")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("redis_sentinels", "redis_cluster_nodes", mode="before")
    @classmethod
    def _split_addresses(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [a.strip() for a in value.split(",") if a.strip()]
        return value

    @field_validator("redis_sentinels", "redis_cluster_nodes")
    @classmethod
    def _host_port(cls, value: list[str]) -> list[str]:
        for address in value:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _mode_needs(self) -> SessionSettings:
        if self.store != "redis":
            return self
        if self.redis_mode == "sentinel" and not self.redis_sentinels:
            raise ValueError("redis_sentinels: required with redis_mode sentinel")
        if self.redis_mode == "cluster":
            if urlsplit(self.redis_url).scheme == "unix":
                raise ValueError("redis_url: a cluster is reached over TCP, not unix://")
            if "{" in self.redis_key_prefix or "}" in self.redis_key_prefix:
                # Cluster hash tags are the first {...} of a key name: the prefix must not
                # open one, or every key would hash to the same slot.
                raise ValueError("redis_key_prefix: no braces with redis_mode cluster")
        return self


class TokenSettings(_Section):
    skew: Duration = Field(60.0, description="Refresh this long before an access token expires.")
    allow_opaque: bool = Field(
        False, description="Accept non-JWT access tokens (their audience cannot be checked)."
    )
    cache_size: int = Field(100_000, ge=1, description="Access tokens kept in memory.")
    dpop: Literal["off", "auto", "required"] = Field(
        "off",
        description="Sender-constrained tokens (DPoP, RFC 9449): auto when discovery lists "
        "dpop_signing_alg_values_supported (a Bearer answer is then accepted); required fails "
        "closed on any token not bound to the key. Upstreams must accept the DPoP scheme.",
    )


class CSRFSettings(_Section):
    header: str = Field("X-CSRF", description="Header required on cookie-authenticated calls.")
    value: str = Field("1", description="Required value of that header.")
    allowed_origins: list[str] = Field(
        default_factory=list, description="Origins allowed on unsafe methods (default public_url)."
    )


class ForwardAuthSettings(_Section):
    enabled: bool = Field(False, description="Serve GET /auth/forward for data planes.")
    secret: SecretStr | None = Field(
        None,
        description="GATEWAY_FORWARD_AUTH__SECRET (32+ characters); callers send it in "
        "X-Forward-Auth-Secret.",
    )
    # NoDecode: the env var is a comma-separated list, not JSON.
    allowed_sources: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDRs the data plane calls from; with a secret too, both must pass.",
    )
    path: str = Field(own_paths.FORWARD_AUTH, description="Path of the endpoint, under /auth/.")
    user_headers: bool = Field(
        False, description="Add X-Auth-Request-User (sub) and X-Auth-Request-Email to 200s."
    )

    @field_validator("secret")
    @classmethod
    def _secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return value

    @field_validator("allowed_sources", mode="before")
    @classmethod
    def _split_sources(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        return value

    @field_validator("allowed_sources")
    @classmethod
    def _sources_are_networks(cls, value: list[str]) -> list[str]:
        try:
            return [str(ipaddress.ip_network(s, strict=False)) for s in value]
        except ValueError as exc:
            raise ValueError(f"not an IP network in CIDR form: {exc}") from None

    @field_validator("path")
    @classmethod
    def _path_shape(cls, value: str) -> str:
        value = value.rstrip("/")
        if (
            not re.fullmatch(r"/auth(/[A-Za-z0-9._~\-]+)+", value)
            or value in own_paths.AUTH_ENDPOINTS
        ):
            raise ValueError(f"must be a path under /auth/ not used by the gateway, got {value!r}")
        if any(seg in (".", "..") for seg in value.split("/")):
            raise ValueError("must not contain . or .. segments")
        return value


class LogSettings(_Section):
    format: Literal["json", "text"] = Field("json", description="Log line format.")
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    access_log: bool = Field(True, description="One line per request on gateway.access.")
    user: Literal["hashed", "omit", "plain"] = Field(
        "hashed", description="The user's `sub` in access logs: a SHA-256 prefix, none, or as is."
    )


class MetricsSettings(_Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics on GET /metrics.")
    port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve /metrics on this port of its own instead of the main app's.",
    )
    host: str = Field("127.0.0.1", description="Address of the separate metrics listener.")


class AdminSettings(_Section):
    """The operator's session API (gateway/admin.py): off unless ``port`` is set."""

    port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve /admin/sessions on this port of its own (off when unset; 0 picks one).",
    )
    host: str = Field("127.0.0.1", description="Address of the admin listener (loopback).")
    token: SecretStr | None = Field(
        None,
        description="GATEWAY_ADMIN__TOKEN (32+ characters): callers send "
        "`Authorization: Bearer <token>`.",
    )

    @field_validator("token")
    @classmethod
    def _token_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return value


class TracingSettings(_Section):
    """OpenTelemetry traces over OTLP/HTTP (gateway/tracing.py); the standard ``OTEL_*``
    environment variables (endpoint, headers, service name, sampler, resource attributes)
    configure the exporter."""

    enabled: bool | None = Field(
        None,
        description="true: on; false: off; unset: on when OTEL_EXPORTER_OTLP_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set.",
    )

    @property
    def is_enabled(self) -> bool:
        if self.enabled is not None:
            return self.enabled
        return bool(
            os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )


class LimitSettings(_Section):
    max_body_bytes: int = Field(0, ge=0, description="0 = unlimited; over it: 413.")
    max_header_bytes: int = Field(65536, ge=1024, description="Request headers over it: 431.")
    body_idle_timeout: Duration = Field(
        15.0,
        description="A request body that sends nothing for this long is cut: 408, and its "
        "upstream request is abandoned (the connection closed). 0 = wait for ever.",
    )
    buffered_body_bytes: int = Field(
        65536,
        ge=0,
        description="A request body whose Content-Length is at most this is read whole before "
        "an upstream connection is taken, so a slow sender holds none. 0 = always stream.",
    )


class UpstreamPoolSettings(_Section):
    """The connections to upstreams: one pool, shared fairly (review finding 2)."""

    max_connections: int = Field(
        1000, ge=1, description="Upstream requests in flight at once, all upstreams together."
    )
    max_connections_per_upstream: int = Field(
        250,
        ge=1,
        description="Upstream requests in flight at once to one upstream (scheme, host, port), "
        "so that one route or upstream cannot take every connection.",
    )
    acquire_timeout: Duration = Field(
        5.0,
        gt=0,
        description="How long a request waits for a free upstream connection; then 503 "
        "upstream_busy with Retry-After.",
    )


AuthMode = Literal["user", "none", "client", "user_or_client", "user_or_none"]
# Modes that use the user's session when there is one (and ask for its audience at login).
USER_MODES = frozenset({"user", "user_or_client", "user_or_none"})
# A claim rule's value: bool first, so that `true` stays a bool and never becomes 1.
ClaimValue = bool | int | float | str


class RouteSettings(_Section):
    prefix: str = Field(description="Path prefix; the longest matching prefix wins.")
    upstream: str = Field(description="Absolute http(s) URL the prefix maps to.")
    name: str = Field("", description="Route id in logs and metrics (default: from prefix).")
    audience: str | None = Field(None, description="Audience (API identifier) of its tokens.")
    scopes: list[str] = Field(default_factory=list, description="Scopes its tokens must carry.")
    timeout: Duration = Field(30.0, gt=0, description="Upstream timeout.")
    strip_prefix: bool = Field(True, description="Strip the prefix before forwarding.")
    auth: AuthMode = Field(
        "user",
        description="user: the user's token (login needed); none: public, no token; client: "
        "the gateway's own client-credentials token; user_or_client: the user's token with a "
        "session, else the client token; user_or_none: the user's token with a session, else "
        "forwarded without Authorization.",
    )
    require: dict[str, ClaimValue | list[ClaimValue]] = Field(
        default_factory=dict,
        description="Claim rules (auth: user): claim name (dotted for nesting, or a URI) -> "
        "value or list of values (any of); every rule must hold, else 403 forbidden.",
    )
    acr_values: list[str] = Field(
        default_factory=list,
        description="Step-up (auth: user): the session's acr must be one of these, else 401 "
        "step_up_required with a login_url that asks the IdP for them.",
    )
    max_age: Duration | None = Field(
        None,
        description="Step-up (auth: user): the user must have authenticated at the IdP within "
        "this long (the ID token's auth_time), else 401 step_up_required.",
    )
    csrf: bool = Field(True, description="Require the anti-CSRF header on this route.")
    websocket: bool = Field(False, description="Allow WebSocket upgrades.")
    websocket_token_expiry: Literal["keep", "close", "reconnect"] = Field(
        "keep",
        description="When the token a WebSocket was opened with expires: keep (the upstream "
        "owns re-auth), close (4401), or reconnect upstream with a fresh token.",
    )
    websocket_max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1, description="Largest WebSocket message either way; over it: 1009."
    )
    websocket_idle_timeout: Duration = Field(
        0.0, description="Close a WebSocket with no message either way this long (0 = never)."
    )
    websocket_max_lifetime: Duration = Field(
        0.0, description="Close a WebSocket this long after it opened (0 = never)."
    )
    forward_cookies: bool = Field(
        False,
        description="Forward the browser's other cookies (never the gateway's own) upstream.",
    )
    max_body_bytes: int | None = Field(None, ge=0, description="Override limits.max_body_bytes.")
    forward_identity_headers: list[str] = Field(
        default_factory=list,
        description="Identity and override headers a client sent that this route still "
        "forwards (by default the gateway drops X-Auth-Request-*, X-Forwarded-* beyond its own, "
        "Remote-User, X-Original-URL, X-Rewrite-URL, True-Client-IP, X-Client-IP, "
        "X-HTTP-Method-Override and the like: upstreams tend to trust them). Names, e.g. "
        "[X-HTTP-Method-Override].",
    )

    @field_validator("forward_identity_headers")
    @classmethod
    def _identity_header_names(cls, value: list[str]) -> list[str]:
        return [check_forwardable_identity_header(name) for name in value]

    @field_validator("prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        return _path_prefix(value, example="/api/")

    @field_validator("upstream")
    @classmethod
    def _upstream_is_url(cls, value: str) -> str:
        _absolute_http_url(value, field="upstream")
        if urlsplit(value).query:
            raise ValueError("upstream must not have a query string")
        return value

    @field_validator("require")
    @classmethod
    def _claim_rules(
        cls, value: dict[str, ClaimValue | list[ClaimValue]]
    ) -> dict[str, ClaimValue | list[ClaimValue]]:
        for claim, expected in value.items():
            if not claim or len(claim) > 256 or claim.startswith(".") or claim.endswith("."):
                raise ValueError(f"not a claim name: {claim[:70]!r}")
            if isinstance(expected, list) and not expected:
                raise ValueError(f"{claim}: an empty list matches nothing")
        return value

    @field_validator("acr_values")
    @classmethod
    def _acr_values_shape(cls, value: list[str]) -> list[str]:
        return [check_acr_value(v) for v in value]

    @model_validator(mode="after")
    def _audience_when_needed(self) -> RouteSettings:
        if self.auth != "none" and not self.audience:
            raise ValueError(f"route {self.prefix}: auth {self.auth} needs an audience")
        if self.auth != "user" and (self.require or self.acr_values or self.max_age is not None):
            raise ValueError(
                f"route {self.prefix}: require, acr_values and max_age judge a user's session: "
                "they need auth user"
            )
        if not self.name:
            object.__setattr__(self, "name", self.prefix.strip("/").replace("/", "_") or "root")
        return self


class StaticSettings(_Section):
    """A directory of static files served by the gateway itself (e.g. the demo page)."""

    path: str = Field(
        "/", description="URL path the files are served under; longer route prefixes still win."
    )
    directory: Path = Field(
        description="Directory holding the files (relative to the working directory); it must "
        "exist. The files are public: served to anyone, GET and HEAD only."
    )
    content_security_policy: str = Field(
        "default-src 'self'; frame-ancestors 'none'",
        description="Content-Security-Policy header of the files ('' sends none); the default "
        "allows same-origin scripts, styles and fetches, no inline code.",
    )

    @field_validator("path")
    @classmethod
    def _path_shape(cls, value: str) -> str:
        return _path_prefix(value, example="/ or /app/")

    @field_validator("content_security_policy")
    @classmethod
    def _header_safe(cls, value: str) -> str:
        if any(not " " <= c <= "~" for c in value):
            raise ValueError("must be printable ASCII on one line")
        return value

    @field_validator("directory")
    @classmethod
    def _directory_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"{value} is not a directory (working directory: {Path.cwd()})")
        return value


class Settings(BaseSettings):
    """The whole configuration; see config/gateway.yaml for a documented example."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    public_url: str = Field("http://127.0.0.1:8000", description="The URL browsers use.")
    oidc: OIDCSettings
    session: SessionSettings = Field(default_factory=SessionSettings)
    tokens: TokenSettings = Field(default_factory=TokenSettings)
    csrf: CSRFSettings = Field(default_factory=CSRFSettings)
    forward_auth: ForwardAuthSettings = Field(default_factory=ForwardAuthSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    upstream_pool: UpstreamPoolSettings = Field(default_factory=UpstreamPoolSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    routes: list[RouteSettings] = Field(default_factory=list, description="The route table.")
    static: StaticSettings | None = Field(
        None, description="Serve a static front end from the gateway (off by default)."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the file (passed as init kwargs by `load_settings`).
        return (env_settings, init_settings)

    @field_validator("public_url")
    @classmethod
    def _public_url_shape(cls, value: str) -> str:
        _absolute_http_url(value, field="public_url")
        parts = urlsplit(value)
        if parts.query or parts.path not in ("", "/"):
            raise ValueError("public_url must be an origin such as https://app.example.com")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        seen: dict[str, int] = {}
        names: dict[str, int] = {}
        for index, route in enumerate(self.routes):
            if route.prefix in seen:
                raise ValueError(f"routes.{index}.prefix: duplicate prefix {route.prefix}")
            if route.name in names:
                raise ValueError(f"routes.{index}.name: duplicate route name {route.name}")
            if own_paths.is_reserved_prefix(route.prefix):
                raise ValueError(f"routes.{index}.prefix: {route.prefix} is reserved")
            seen[route.prefix] = index
            names[route.name] = index
        if self.session.store == "redis" and not self.session.secret_key:
            raise ValueError(
                "session.secret_key: required with the redis store "
                "(set GATEWAY_SESSION__SECRET_KEY)"
            )
        method = self.oidc.client_auth
        for index, route in enumerate(self.routes):
            if route.auth in ("client", "user_or_client") and method == "none":
                raise ValueError(
                    f"routes.{index}.auth: {route.auth} needs client credentials "
                    "(oidc.client_auth none cannot ask for a client token)"
                )
        if method.startswith("client_secret") and self.oidc.client_secret is None:
            raise ValueError(
                f"oidc.client_secret: required for {method} (set GATEWAY_OIDC__CLIENT_SECRET)"
            )
        if method == "private_key_jwt":
            from .client_keys import load_private_keys  # pure; reads the key file once

            if self.oidc.private_key is None and self.oidc.private_key_file is None:
                raise ValueError(
                    "oidc.private_key: required for private_key_jwt (set "
                    "GATEWAY_OIDC__PRIVATE_KEY or oidc.private_key_file)"
                )
            pem = self.oidc.private_key
            load_private_keys(  # a ValueError names the field, never the key
                pem.get_secret_value() if pem is not None else None,
                self.oidc.private_key_file,
                alg=self.oidc.private_key_alg,
            )
        if self.admin.port is not None and self.admin.token is None:
            raise ValueError(
                "admin.token: required when admin.port is set (set GATEWAY_ADMIN__TOKEN)"
            )
        forward = self.forward_auth
        if forward.enabled and forward.secret is None and not forward.allowed_sources:
            raise ValueError(
                "forward_auth.secret: required when forward_auth is enabled "
                "(set GATEWAY_FORWARD_AUTH__SECRET), unless forward_auth.allowed_sources "
                "restricts the callers"
            )
        return self

    @model_validator(mode="after")
    def _static_checks(self) -> Settings:
        if self.static is not None:
            if own_paths.is_reserved_prefix(self.static.path):
                raise ValueError(f"static.path: {self.static.path} is reserved")
            if any(route.prefix == self.static.path for route in self.routes):
                raise ValueError(f"static.path: {self.static.path} is also a route prefix")
        return self

    @property
    def is_https(self) -> bool:
        return self.public_url.startswith("https://")

    @property
    def allowed_origins(self) -> list[str]:
        return self.csrf.allowed_origins or [self.public_url]

    @property
    def redirect_uri(self) -> str:
        return self.public_url + own_paths.CALLBACK


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field (``routes.1.audience: ...``)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return "\n".join(lines)


def default_config_path() -> Path:
    return Path(os.environ.get("GATEWAY_CONFIG", "config/gateway.yaml"))


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load the YAML file (if it exists), apply env vars, validate; raise ConfigError."""
    config_path = Path(path) if path is not None else default_config_path()
    data: dict[str, Any] = {}
    if config_path.exists():
        try:
            loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_path}: not valid YAML ({exc})") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{config_path}: the top level must be a mapping")
        data = loaded or {}
    elif path is not None:
        raise ConfigError(f"{config_path}: no such file")
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc
