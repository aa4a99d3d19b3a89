"""The vault's HTTPS service: Azure Key Vault keys REST API, an OAuth2
client-credentials token endpoint, and the bearer challenge the Azure SDK
expects.

Request pipeline (every request, good or bad, ends in exactly one audit
record): size and framing checks (413/411 before the body is read) ->
token endpoint / OpenID discovery (no bearer needed) -> bearer token (401 with
``WWW-Authenticate: Bearer authorization="https://HOST:PORT/{tenant}",
resource="https://HOST:PORT"``) -> ``api-version`` (400 BadParameter) ->
route (404 NotFound / 405 MethodNotAllowed) -> JSON body (400 BadParameter) ->
access policy (403 Forbidden, inner AccessDenied) -> the operation
(:mod:`keyops`). Errors are ``{"error": {"code", "message"[, "innererror"]}}``.
Besides Azure's operations, ``POST /keys/NAME/VERSION/unwrapkeys`` (blockcrypt's
extension, keyops ``unwrap_many``) answers many unwraps in one request, through the same
pipeline, with one audit record per unwrap, all durable before the answer.

Transport: stdlib ``ThreadingHTTPServer`` + ``ssl`` (TLS 1.2+), one thread per
connection, HTTP/1.1 keep-alive. The TLS handshake runs in the connection's
thread, not the accept loop; a connection whose first byte is not a TLS
handshake record gets a plain-text HTTP 400 with an Azure-shaped JSON body
telling it to use https, and is closed. The stdlib was chosen over an ASGI
stack because the API is small, the SDK needs nothing more than HTTP/1.1, and
it adds no dependency.

Limits (VaultServer): a connection cap (total and per client address) and a
deadline for each request's headers and body, so slow or trickling clients
cannot hold threads and file descriptors for long.

Caveats: no request-rate limiting; thread count is bounded by the connection
cap (idle connections time out after ``IDLE_TIMEOUT_SECONDS``);
the vault's base URL is derived from ``--listen`` (or ``--public-url``) and is
what ``kid`` values and token audiences name.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import ssl
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from . import audit, identities, policies
from ...errors import TokenInvalid, VaultApiError as ApiError
from .keyops import KeyOps, bad
from .store import Store, write_private

API_VERSIONS = ("7.4", "7.5", "7.6", "2025-07-01")
LATEST_API_VERSION = "2025-07-01"
MAX_BODY_BYTES = 64 * 1024
DRAIN_LIMIT_BYTES = 16 * 1024 * 1024
IDLE_TIMEOUT_SECONDS = 30
REQUEST_TIMEOUT_SECONDS = 30      # a whole request (headers and body) must arrive within this
MAX_CONNECTIONS = 512             # below the usual 1024 fd limit: a flood cannot starve accept()
MAX_PER_CLIENT = 64               # connections from one address
SWEEP_INTERVAL_SECONDS = 60
_TOKEN_RE = re.compile(r"^/([^/]{1,100})/oauth2/v2\.0/token$")
_OIDC_RE = re.compile(r"^/([^/]{1,100})/v2\.0/\.well-known/openid-configuration$")
_CTX_RE = re.compile(r"^[\x21-\x7e]{1,128}$")


class Route:
    __slots__ = ("operation", "permission", "call", "needs_body", "key", "version", "status", "batch")

    def __init__(self, operation, permission, call, *, needs_body=False, key=None, version=None, status=200,
                 batch=False):
        self.operation, self.permission, self.call = operation, permission, call
        self.needs_body, self.key, self.version, self.status = needs_body, key, version, status
        self.batch = batch   # call returns (body, the audit fields of each item)


def route(ops: KeyOps, method: str, path: str) -> Route:
    parts = path.split("/")[1:]
    if not parts or parts[0] not in ("keys", "deletedkeys"):
        raise ApiError(404, "NotFound", f"The requested URI {path[:200]} does not name a Key Vault operation.")
    allowed_methods: list[str] = []

    def pick(table: dict) -> Route:
        r = table.get(method)
        if r is None:
            allowed_methods.extend(table)
            raise ApiError(405, "MethodNotAllowed",
                           f"The requested resource does not support http method '{method}'.")
        return r

    if parts[0] == "keys":
        if len(parts) == 1 or (len(parts) == 2 and parts[1] == ""):
            return pick({"GET": Route("KeyList", "list", lambda b, oc: ops.list_keys())})
        name = parts[1]
        if len(parts) == 2:
            return pick({
                "GET": Route("KeyGet", "get", lambda b, oc: ops.get(name, None), key=name),
                "PUT": Route("KeyImport", "import", lambda b, oc: ops.import_key(name, b, oc), needs_body=True, key=name),
                "PATCH": Route("KeyUpdate", "update", lambda b, oc: ops.update(name, None, b, oc), needs_body=True,
                               key=name),
                "DELETE": Route("KeyDelete", "delete", lambda b, oc: ops.delete(name, oc), key=name),
            })
        third = parts[2]
        if len(parts) == 3:
            if third == "create":
                return pick({"POST": Route("KeyCreate", "create", lambda b, oc: ops.create(name, b, oc), needs_body=True,
                                           key=name)})
            if third == "rotate":
                return pick({"POST": Route("KeyRotate", "rotate", lambda b, oc: ops.rotate(name, oc), key=name)})
            if third == "versions":
                return pick({"GET": Route("KeyListVersions", "list", lambda b, oc: ops.list_versions(name), key=name)})
            version = third or None
            return pick({
                "GET": Route("KeyGet", "get", lambda b, oc: ops.get(name, version), key=name, version=version),
                "PATCH": Route("KeyUpdate", "update", lambda b, oc: ops.update(name, version, b, oc), needs_body=True,
                               key=name, version=version),
            })
        if len(parts) == 4:
            version = third or None
            cops = {"wrapkey": ("KeyWrap", "wrapKey"), "unwrapkey": ("KeyUnwrap", "unwrapKey"),
                    "encrypt": ("KeyEncrypt", "encrypt"), "decrypt": ("KeyDecrypt", "decrypt")}
            if parts[3].lower() in cops:
                operation, op = cops[parts[3].lower()]
                return pick({"POST": Route(operation, op, lambda b, oc: ops.crypto(op, name, version, b),
                                           needs_body=True, key=name, version=version)})
            if parts[3].lower() == "unwrapkeys":   # blockcrypt's extension: many unwraps, one record each
                return pick({"POST": Route("KeyUnwrap", "unwrapKey", lambda b, oc: ops.unwrap_many(name, version, b),
                                           needs_body=True, key=name, version=version, batch=True)})
    else:
        if len(parts) == 1 or (len(parts) == 2 and parts[1] == ""):
            return pick({"GET": Route("KeyListDeleted", "list", lambda b, oc: ops.list_deleted())})
        name = parts[1]
        if len(parts) == 2:
            return pick({
                "GET": Route("KeyGetDeleted", "get", lambda b, oc: ops.get_deleted(name), key=name),
                "DELETE": Route("KeyPurge", "purge", lambda b, oc: ops.purge(name, on_commit=oc), key=name, status=204),
            })
        if len(parts) == 3 and parts[2] == "recover":
            return pick({"POST": Route("KeyRecover", "recover", lambda b, oc: ops.recover(name, oc), key=name)})
    raise ApiError(404, "NotFound", f"The requested URI {path[:200]} does not name a Key Vault operation.")


class VaultApp:
    """Everything a request handler needs, shared by all connections."""

    def __init__(self, store: Store, base_url: str, *, token_ttl_seconds: int, hsm=None, verbose=False):
        self.store = store
        self.base_url = base_url.rstrip("/")
        self.tenant_id = store.config.tenant_id
        self.token_ttl_seconds = token_ttl_seconds
        self.ops = KeyOps(store, self.base_url, hsm=hsm)
        self.verbose = verbose
        self.audit_log = audit.GroupCommit(store)
        self.metrics = None  # metrics.VaultMetrics when serve() has --metrics

    def observe(self, fields: dict, started: float | None = None) -> None:
        """Count one answered request in the metrics (issue 16), by its audit fields."""
        if self.metrics is not None:
            self.metrics.observe(fields.get("operation"), fields.get("status"),
                                 None if started is None else time.monotonic() - started)

    def challenge(self) -> str:
        return f'Bearer authorization="{self.base_url}/{self.tenant_id}", resource="{self.base_url}"'

    def audit(self, fields: dict) -> None:
        """Append a record; returns once it is durable (audit.GroupCommit: concurrent requests'
        records share one commit)."""
        self.audit_all([fields])

    def audit_all(self, records: list[dict]) -> None:
        """Append records in order (one request's, e.g. each unwrap of an unwrapkeys request);
        returns once they are durable."""
        try:
            self.audit_log.append_all(records)
        except Exception as e:  # the audit must never take the service down; say so loudly
            print(f"vault: audit append failed: {e}", file=sys.stderr, flush=True)

    def sweep(self) -> None:
        def on_purge(c, name):
            audit.append(c, {"identity": "system", "operation": "KeyAutoPurge", "key": name, "status": 204,
                             "result": "ok", "detail": "retention period lapsed"},
                         self.store.audit_key)
        try:
            self.ops.sweep(on_purge=on_purge)
        except Exception as e:
            print(f"vault: purge sweep failed: {e}", file=sys.stderr, flush=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "blockcrypt-vault"
    app: VaultApp  # set on the subclass made by serve()

    def version_string(self):
        return self.server_version

    # -- plumbing ---------------------------------------------------------------------------
    def log_message(self, fmt, *args):  # the audit log is the access log
        if self.app.verbose:
            sys.stderr.write("vault: " + (fmt % args) + "\n")

    def _send(self, status: int, body: dict | None, headers: dict | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("x-ms-request-id", self._request_id)
        self.send_header("x-ms-keyvault-service-version", "blockcrypt-1")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """Malformed request lines/headers from http.server: answer Azure-shaped JSON."""
        self._request_id = getattr(self, "_request_id", str(uuid.uuid4()))
        self.close_connection = True
        codes = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 408: "RequestTimeout",
                 414: "RequestUriTooLong", 431: "RequestHeaderFieldsTooLarge", 501: "NotImplemented",
                 505: "HttpVersionNotSupported"}
        status = 405 if code == 501 else code
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.1"  # answer with a status line and headers even to garbage
        text = (message or "Bad request")[:200]
        if code == 501:
            text = f"The requested resource does not support http method '{self.command}'."
        try:
            self._send(status, {"error": {"code": codes.get(status, "BadRequest"), "message": text}})
        except OSError:
            pass
        self.app.audit({"identity": "-", "operation": "HttpError", "status": status,
                        "result": codes.get(status, "BadRequest"), "remote": self.client_address[0],
                        "detail": text[:200]})
        self.app.observe({"operation": "HttpError", "status": status})

    def handle_one_request(self):
        fd = self.connection.fileno()
        self.server.set_deadline(fd, self.server.request_timeout)  # headers and body, from now
        super().handle_one_request()

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    # -- the request -------------------------------------------------------------------------
    def _dispatch(self) -> None:
        started = time.monotonic()
        fields = {}
        try:
            self._dispatch_one(started, fields)
        finally:
            self.app.observe(fields, started)

    def _dispatch_one(self, started: float, fields: dict) -> None:
        self._request_id = str(uuid.uuid4())
        parsed = urlsplit(self.path)
        path = parsed.path
        fields.update({"identity": "-", "operation": "Unknown", "remote": self.client_address[0],
                  "request_id": _ctx(self.headers.get("x-ms-client-request-id")),
                  "disk_id": _ctx(self.headers.get("x-blockcrypt-disk-id")),
                  "method": self.command, "path": path[:200]})
        headers = {}
        try:
            body_bytes = self._read_body()
            self.server.set_deadline(self.connection.fileno(), None)  # in: the work has no deadline
            tm = _TOKEN_RE.match(path)
            om = _OIDC_RE.match(path)
            if tm or om:
                self._oauth(tm, om, body_bytes, fields)
                return
            try:  # name the operation in the audit record even when auth fails
                r, route_err = route(self.app.ops, self.command, path), None
                fields.update(operation=r.operation, key=(r.key or "")[:128], version=(r.version or "")[:64])
            except ApiError as e:
                r, route_err = None, e
            ident = self._authenticate(fields, headers)
            _check_api_version(parse_qs(parsed.query, keep_blank_values=True))
            if route_err is not None:
                raise route_err
            body = _parse_json(body_bytes) if r.needs_body else {}
            if not policies.allowed(self.app.store, ident, r.permission):
                raise ApiError(403, "Forbidden",
                               f"The user, group or application '{ident['name']}' (appid={ident['client_id']}) "
                               f"does not have keys {r.permission} permission on key vault "
                               f"'{self.app.base_url}'.", "AccessDenied")
            committed = []

            def on_commit(c, result):  # a change and its audit record commit together
                _note_version(fields, result)
                fields.update(status=r.status, result="ok")
                audit.append(c, _done(fields, started), self.app.store.audit_key)
                committed.append(True)
            result = r.call(body, on_commit)
            if r.batch:   # one record per item, all durable before the answer
                result, outcomes = result
                _note_version(fields, result)
                fields.update(status=r.status, result="ok")   # the request's (metrics); each item's below
                self.app.audit_all([_done({**fields, **o}, started) for o in outcomes])
            elif not committed:  # a read: audit it before answering
                _note_version(fields, result)
                fields.update(status=r.status, result="ok")
                self.app.audit(_done(fields, started))
            self._send(r.status, None if r.status == 204 else result)
        except ApiError as e:
            fields.update(status=e.status, result=e.inner or e.code)
            if e.status == 401:
                headers["WWW-Authenticate"] = self.app.challenge()
            if e.status in (411, 413):
                self.close_connection = True
            self.app.audit(_done({**fields, "detail": str(e)[:300]}, started))
            self._send(e.status, e.body(), headers)
        except (ConnectionError, ssl.SSLError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # a bug: answer 500, keep serving, never echo internals
            traceback.print_exc(file=sys.stderr)
            fields.update(status=500, result="InternalError", detail=type(e).__name__)
            self.app.audit(_done(fields, started))
            self.close_connection = True
            try:
                self._send(500, {"error": {"code": "InternalError",
                                           "message": "The vault hit an internal error; see its log."}})
            except OSError:
                pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "LengthRequired", "Chunked request bodies are not accepted; send Content-Length.")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "BadParameter", "The Content-Length header is invalid.") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            if length <= DRAIN_LIMIT_BYTES:  # read it away so the client sees our answer, not a reset
                left = length
                while left > 0:
                    chunk = self.rfile.read(min(left, 65536))
                    if not chunk:
                        break
                    left -= len(chunk)
            raise ApiError(413, "RequestEntityTooLarge",
                           f"The request body is {length} bytes; the limit is {MAX_BODY_BYTES} bytes.")
        data = self.rfile.read(length)
        if len(data) != length:
            self.close_connection = True
            raise ConnectionError("short body")
        return data

    def _authenticate(self, fields: dict, headers: dict) -> dict:
        auth = self.headers.get("Authorization", "")
        if not auth:
            raise ApiError(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.")
        try:
            claims = identities.verify_token(self.app.store.token_key, token.strip(),
                                             tenant_id=self.app.tenant_id, audience=self.app.base_url)
        except TokenInvalid as e:
            raise ApiError(401, "Unauthorized", f"AKV10032: Invalid bearer token: {e}.") from None
        ident = identities.lookup_client(self.app.store, claims["sub"])
        if ident is None:
            raise ApiError(401, "Unauthorized", "AKV10032: Invalid bearer token: the identity no longer exists.")
        fields.update(identity=ident["name"], client_id=ident["client_id"])
        return ident

    # -- OAuth2 -----------------------------------------------------------------------------
    def _oauth(self, tm, om, body_bytes: bytes, fields: dict) -> None:
        tenant = (tm or om).group(1)
        base = self.app.base_url
        if om:
            fields.update(operation="OpenIdConfiguration")
            if self.command != "GET":
                raise ApiError(405, "MethodNotAllowed", f"Use GET for {om.group(0)}.")
            if tenant != self.app.tenant_id:
                return self._oauth_error(fields, 400, "invalid_tenant", f"Tenant '{tenant[:64]}' not found.")
            auth = f"{base}/{tenant}"
            doc = {"issuer": f"{auth}/v2.0", "token_endpoint": f"{auth}/oauth2/v2.0/token",
                   "authorization_endpoint": f"{auth}/oauth2/v2.0/authorize",
                   "device_authorization_endpoint": f"{auth}/oauth2/v2.0/devicecode",
                   "jwks_uri": f"{auth}/discovery/v2.0/keys", "tenant_region_scope": None,
                   "response_types_supported": ["token"], "grant_types_supported": ["client_credentials"],
                   "token_endpoint_auth_methods_supported": ["client_secret_post"]}
            fields.update(status=200, result="ok")
            self.app.audit(fields)
            self._send(200, doc)
            return
        fields.update(operation="TokenIssue")
        if self.command != "POST":
            raise ApiError(405, "MethodNotAllowed", "Use POST for the token endpoint.")
        if tenant != self.app.tenant_id:
            return self._oauth_error(fields, 400, "invalid_request", f"AADSTS90002: Tenant '{tenant[:64]}' not found.")
        try:
            form = parse_qs(body_bytes.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body_bytes))
        except (UnicodeDecodeError, ValueError):
            return self._oauth_error(fields, 400, "invalid_request", "The request body must be form-encoded.")
        one = {k: v[0] for k, v in form.items() if len(v) == 1}
        if one.get("grant_type") != "client_credentials":
            return self._oauth_error(fields, 400, "unsupported_grant_type",
                                     "Only grant_type=client_credentials is supported.")
        client_id, secret = one.get("client_id", ""), one.get("client_secret", "")
        scope = one.get("scope", "")
        want_scope = f"{base}/.default"
        if not client_id or not secret:
            return self._oauth_error(fields, 400, "invalid_request", "client_id and client_secret are required.")
        fields["client_id"] = client_id[:64]
        if scope.split() != [want_scope] and scope.split() != [base]:
            return self._oauth_error(fields, 400, "invalid_scope",
                                     f"The scope must be '{want_scope}'.")
        ident = identities.check_secret(self.app.store, client_id, secret)
        if ident is None:
            return self._oauth_error(fields, 401, "invalid_client",
                                     "AADSTS7000215: Invalid client secret or unknown client id.")
        token, exp = identities.issue_token(self.app.store.token_key, client_id=ident["client_id"],
                                            tenant_id=self.app.tenant_id, audience=base,
                                            ttl_seconds=self.app.token_ttl_seconds)
        fields.update(identity=ident["name"], status=200, result="ok")
        self.app.audit(fields)
        ttl = exp - int(time.time())
        self._send(200, {"token_type": "Bearer", "expires_in": ttl, "ext_expires_in": ttl, "expires_on": exp,
                         "access_token": token})

    def _oauth_error(self, fields: dict, status: int, error: str, description: str) -> None:
        fields.update(status=status, result=error, detail=description[:200])
        self.app.audit(fields)
        self._send(status, {"error": error, "error_description": description,
                            "error_codes": [], "correlation_id": self._request_id})


def _note_version(fields: dict, result) -> None:
    if not isinstance(result, dict):
        return
    kid = result["key"].get("kid", "") if isinstance(result.get("key"), dict) else result.get("kid", "")
    if isinstance(kid, str) and kid.count("/") >= 5:  # https://host/keys/name/version
        fields["version"] = kid.rsplit("/", 1)[-1]


def _ctx(v):
    return v if v and _CTX_RE.match(v) else None


def _done(fields: dict, started: float) -> dict:
    return {**fields, "duration_ms": round((time.monotonic() - started) * 1000, 1)}


def _check_api_version(query: dict) -> None:
    v = query.get("api-version")
    if not v or not v[0]:
        raise bad("The 'api-version' query parameter is missing.")
    if len(v) > 1 or v[0] not in API_VERSIONS:
        raise bad(f"The specified version ({v[-1][:40]}) is not recognized. Consider using the latest "
                  f"supported version ({LATEST_API_VERSION}).")


def _parse_json(data: bytes) -> dict:
    if not data:
        raise bad("The request body is missing; a JSON object is required.")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.")
    return body


class VaultServer(ThreadingHTTPServer):
    """HTTPS on the stdlib server, with limits: at most ``max_connections`` connections (and
    ``max_per_client`` from one address); a connection over either is closed at accept. Each
    request, from the wait for its first byte to the last byte of its body (TLS handshake
    included for the first), must arrive within ``request_timeout`` seconds, or a reaper
    shuts the connection down: a client trickling a byte every few seconds holds a thread
    for that long at most."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler_cls, ssl_ctx: ssl.SSLContext, app: VaultApp, family=socket.AF_INET, *,
                 max_connections: int = MAX_CONNECTIONS, max_per_client: int = MAX_PER_CLIENT,
                 request_timeout: float = REQUEST_TIMEOUT_SECONDS):
        self.address_family = family
        self.ssl_ctx = ssl_ctx
        self.app = app
        self.max_connections, self.max_per_client = max_connections, max_per_client
        self.request_timeout = request_timeout
        self._conns: dict[int, list] = {}     # fd -> [client address, deadline or None]
        self._conns_lock = threading.Lock()
        self.refused_connections = 0
        super().__init__(addr, handler_cls)
        threading.Thread(target=self._reap, name="vault-reaper", daemon=True).start()

    # -- limits ----------------------------------------------------------------------------------
    def process_request(self, request, client_address):
        ip = client_address[0]
        with self._conns_lock:
            mine = sum(1 for c in self._conns.values() if c[0] == ip)
            over = len(self._conns) >= self.max_connections or mine >= self.max_per_client
            if not over:
                self._conns[request.fileno()] = [ip, time.monotonic() + self.request_timeout]
        if over:
            self.refused_connections += 1
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def set_deadline(self, fd: int, seconds: float | None) -> None:
        """The request on connection ``fd`` must be in within ``seconds`` (None: no deadline)."""
        with self._conns_lock:
            c = self._conns.get(fd)
            if c is not None:
                c[1] = None if seconds is None else time.monotonic() + seconds

    def _forget(self, fd: int) -> None:
        with self._conns_lock:  # before the socket closes: the reaper never touches a reused fd
            self._conns.pop(fd, None)

    def _reap(self) -> None:
        while True:
            time.sleep(min(0.5, self.request_timeout / 4))
            now = time.monotonic()
            with self._conns_lock:
                for fd, (_, deadline) in list(self._conns.items()):
                    if deadline is not None and now > deadline:
                        # the slot is free once the connection is shut down, not when its thread
                        # gets round to closing it: a client that saw the EOF may connect again
                        # at once. The fd stays open (so unreused) until that thread's _forget.
                        del self._conns[fd]
                        try:  # a duplicate of the fd: shutdown acts on the connection, not the fd
                            with socket.fromfd(fd, self.address_family, socket.SOCK_STREAM) as dup:
                                dup.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass

    def finish_request(self, request, client_address):
        fd = request.fileno()
        try:
            self._finish_request(request, client_address, fd)
        finally:
            # the TLS path detached `request` (fileno -1), forgot fd and closed it itself: fd may
            # already be a new connection's, whose entry must stay
            if request.fileno() == fd:
                self._forget(fd)

    def _finish_request(self, request, client_address, fd):
        request.settimeout(IDLE_TIMEOUT_SECONDS)
        try:  # headers and body go out in separate writes: don't let Nagle + delayed ACK add 40 ms
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            first = request.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if not first:
            return
        if first != b"\x16":
            self._refuse_plain(request, client_address)
            return
        try:
            tls = self.ssl_ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        except (ssl.SSLError, OSError):
            pass
        finally:
            self._forget(fd)
            try:
                tls.close()
            except OSError:
                pass

    def _refuse_plain(self, sock, client_address) -> None:
        try:
            sock.settimeout(2)
            head = sock.recv(8192)
        except OSError:
            head = b""
        line = head.split(b"\r\n", 1)[0][:120].decode("latin-1", "replace")
        body = json.dumps({"error": {"code": "BadRequest", "message":
                                     f"This vault speaks HTTPS only; use {self.app.base_url}"}}).encode()
        resp = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json; charset=utf-8\r\n"
                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        try:
            sock.sendall(resp)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.app.audit({"identity": "-", "operation": "PlainHttpRefused", "status": 400, "result": "BadRequest",
                        "remote": client_address[0], "detail": line})
        self.app.observe({"operation": "PlainHttpRefused", "status": 400})


def make_ssl_context(vault_dir: Path, password: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(vault_dir / "server.pem"), str(vault_dir / "server.key"), password=password)
    return ctx


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--listen must be HOST:PORT, not {listen!r}")
    host = host.strip("[]")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port out of range in {listen!r}")
    return host, int(port)


def _refuse_if_served(vault_dir: Path) -> None:
    """One server per vault directory: refuse if serve.json names a live `vault serve` process."""
    try:
        info = json.loads((vault_dir / "serve.json").read_text())
        pid = int(info["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return
    if pid != os.getpid() and b"serve" in cmdline and b"vault" in cmdline:
        from ...errors import Busy
        raise Busy(f"vault {vault_dir} is already served by pid {pid} at {info.get('url')}")


#: what must be private to the vault's user: the directory and its secrets
PRIVATE_FILES = ("", "master.key", "vault.db", "server.key", "ca.key", "admin.json")


def refuse_loose_permissions(vault_dir: Path) -> None:
    """Refuse to serve when the vault directory or a secret in it is open to group or others
    (as the platform key store refuses): the master key unseals every key in the vault."""
    for name in PRIVATE_FILES:
        p = vault_dir / name if name else vault_dir
        try:
            mode = stat.S_IMODE(os.stat(p).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            from ...errors import StateError
            want = "700" if not name else "600"
            raise StateError(path=str(vault_dir), why=f"{p} has mode {mode:04o}, too open; the vault does not "
                                                      f"serve with loose permissions (chmod {want} {p})")


def serve(vault_dir: str, listen: str, *, token_ttl_seconds: int = identities.DEFAULT_TOKEN_TTL_SECONDS,
          public_url: str | None = None, hsm=None, verbose: bool = False, ready=None,
          max_connections: int = MAX_CONNECTIONS, max_per_client: int = MAX_PER_CLIENT,
          request_timeout: float = REQUEST_TIMEOUT_SECONDS, metrics_listen: str | None = None,
          metrics_allow_remote: bool = False, announce: bool = True) -> None:
    """Run the vault until SIGTERM/SIGINT. Prints (unless not ``announce``) and writes
    (serve.json) its URL once listening. ``metrics_listen``: HOST:PORT of a Prometheus
    endpoint (loopback unless allowed). Under systemd Type=notify it sends READY=1 once
    listening and STOPPING=1 when it stops."""
    from ..._util.sdnotify import notify
    host, port = parse_listen(listen)
    if metrics_listen:
        from ..._util.metricsweb import check_listen
        check_listen(metrics_listen, metrics_allow_remote)
    _refuse_if_served(Path(vault_dir))
    refuse_loose_permissions(Path(vault_dir))
    store = Store(vault_dir)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ctx = make_ssl_context(store.dir, store.tls_password)
    server = None
    try:
        app = VaultApp(store, "https://placeholder", token_ttl_seconds=token_ttl_seconds, hsm=hsm,
                       verbose=verbose)
        handler = type("BoundHandler", (Handler,), {"app": app})
        server = VaultServer((host, port), handler, ctx, app, family=family, max_connections=max_connections,
                             max_per_client=max_per_client, request_timeout=request_timeout)
        real_port = server.server_address[1]
        shown_host = f"[{host}]" if ":" in host else host
        base = (public_url or f"https://{shown_host}:{real_port}").rstrip("/")
        app.base_url = base
        app.ops.base_url = base
        app.sweep()
        info = {"url": base, "pid": os.getpid(), "ca": str(store.dir / "ca.pem"), "tenant_id": store.config.tenant_id}
        stop_metrics = None
        if metrics_listen:
            from . import metrics as vault_metrics
            app.metrics, info["metrics"], stop_metrics = vault_metrics.start(metrics_listen, server,
                                                                             metrics_allow_remote)
            print(f"vault metrics on {info['metrics']}", flush=True)
        write_private(store.dir / "serve.json", json.dumps(info).encode())
        app.audit({"identity": "system", "operation": "VaultStart", "status": 200, "result": "ok", "detail": base})

        stop = threading.Event()

        def sweeper():
            while not stop.wait(SWEEP_INTERVAL_SECONDS):
                app.sweep()
        threading.Thread(target=sweeper, name="vault-sweep", daemon=True).start()

        def on_signal(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, on_signal)
        if announce:
            print(f"vault listening on {base}", flush=True)
        notify("READY=1", f"STATUS=serving {base}")
        if ready:
            ready(base)
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            notify("STOPPING=1")
            stop.set()
            if stop_metrics is not None:
                stop_metrics()
            app.audit({"identity": "system", "operation": "VaultStop", "status": 200, "result": "ok"})
            try:
                (store.dir / "serve.json").unlink()
            except OSError:
                pass
    finally:
        if server is not None:
            server.server_close()
        store.close()
