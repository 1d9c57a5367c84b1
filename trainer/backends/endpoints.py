"""Which API key goes where: endpoints the server's owner configured, so a workflow never chooses both.

ComfyUI runs any graph anyone who reaches its port queues, and people load workflows others
shared, so every widget value is untrusted. If a workflow could name both the URL and the
environment variable whose value is sent there as the key, it could send ``AWS_SECRET_ACCESS_KEY``
to its own server. So keys are bound to endpoints in a settings file only the owner writes:

.. code-block:: toml

    # ComfyUI/user/selma/endpoints.toml, or the file $SELMA_ENDPOINTS names
    [endpoints.lab]
    base_url = "https://llm.lab.example/v1"
    api_key_env = "LAB_LLM_KEY"   # optional: the NAME of the variable holding the key
    api = "chat"                  # optional: the one API this endpoint serves

A workflow picks a configured endpoint (by name, or by its exact URL, which keeps saved
workflows working) and gets that endpoint's key; any other URL is called without a key. The
built-in ``openai`` endpoint binds ``OPENAI_API_KEY`` to ``https://api.openai.com/v1``; the file
may replace it. A key never travels over plain http except to this machine (loopback).

The command line is run by the owner and keeps choosing URL and key itself; it shares the
transport rule and the URL redaction (:func:`redact_url`) used in every message.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ENDPOINTS_ENV = "SELMA_ENDPOINTS"
APIS = ("completions", "chat")
# Capitals, digits and '_' (POSIX's portable names): API keys nearly always hold lowercase letters, so a key
# pasted into the name field is refused rather than echoed back in a "variable not set" message.
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
_ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ENDPOINT_FIELDS = ("base_url", "api_key_env", "api")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class EndpointError(ValueError):
    """An endpoints file or a workflow's choice of endpoint that cannot be used; says why and what to do."""


@dataclass(frozen=True)
class Endpoint:
    """One endpoint the owner configured: where it is, which variable's key it gets ("" none), its API ("" any)."""

    name: str
    base_url: str
    api_key_env: str = ""
    api: str = ""


BUILTIN_ENDPOINTS: Mapping[str, Endpoint] = {
    "openai": Endpoint("openai", "https://api.openai.com/v1", "OPENAI_API_KEY"),
}


@dataclass(frozen=True)
class Endpoints:
    """The endpoints in force and where they were read from (for messages)."""

    by_name: Mapping[str, Endpoint]
    source: str


@dataclass(frozen=True)
class Route:
    """Where a workflow's requests go: the URL, the key variable ("" no key), the endpoint ("" an ad-hoc URL)."""

    base_url: str
    api_key_env: str
    endpoint: str


def check_env_name(name: str, field: str = "api_key_env") -> str:
    """Return ``name`` if it can name an environment variable. The value is never echoed: it may be a key."""
    if not _ENV_NAME.match(name or ""):
        raise EndpointError(f"{field}: expected the NAME of an environment variable holding the API key (capital "
                            "letters, digits and '_', e.g. OPENAI_API_KEY), not the key itself; the value given is "
                            "not such a name and is not shown here")
    return name


# --- URLs ---------------------------------------------------------------------------------------------------


def is_http_url(text: str) -> bool:
    """An http(s) URL with a host."""
    try:
        parts = urlsplit(text)
        return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """``url`` with its user info and every query value replaced by ``***``: what messages may show."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(a URL that cannot be parsed, not shown)"
    if ":" in host:
        host = f"[{host}]"
    netloc = ("***@" if "@" in parts.netloc else "") + host + (f":{port}" if port is not None else "")
    query = urlencode([(name, "***") for name, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def url_secrets(url: str) -> list[str]:
    """The parts of ``url`` that may be credentials (user, password, query values), to redact from server text."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    secrets = [parts.username or "", parts.password or ""]
    secrets += [value for _, value in parse_qsl(parts.query, keep_blank_values=True)]
    return [secret for secret in secrets if len(secret) >= 4]


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***`` (longest first, so a secret inside another goes too)."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_transport_problem(base_url: str) -> str | None:
    """Why a key must not be sent to ``base_url`` (plain http to another machine), or None."""
    parts = urlsplit(base_url)
    if parts.scheme.lower() == "http" and not is_loopback(parts.hostname):
        return (f"the key would travel unencrypted over plain http to {redact_url(base_url)}; a key goes over http "
                "only to this machine (localhost, 127.0.0.1, ::1): use an https URL")
    return None


def _url_identity(url: str) -> tuple[str, str, int | None, str, str]:
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or ""), parts.port or _DEFAULT_PORTS.get(scheme), parts.path.rstrip("/"), parts.query


def same_url(first: str, second: str) -> bool:
    """Whether two spellings name one endpoint (case of scheme and host, default port, trailing '/' aside)."""
    try:
        return _url_identity(first) == _url_identity(second)
    except ValueError:
        return False


# --- the endpoints file -------------------------------------------------------------------------------------


def endpoints_file(default: Path | None) -> Path | None:
    """The endpoints file: ``$SELMA_ENDPOINTS`` if set, else ``default`` (the node: ComfyUI's user folder)."""
    named = os.environ.get(ENDPOINTS_ENV, "").strip()
    return Path(named).expanduser() if named else default


def load_endpoints(path: Path | None) -> Endpoints:
    """The built-in endpoints plus those in ``path`` (a missing file adds none); a bad file is an error."""
    if path is None or not path.exists():
        where = f"{path} does not exist" if path is not None else "no endpoints file"
        return Endpoints(dict(BUILTIN_ENDPOINTS), f"built-in only; {where}")
    try:
        with path.open("rb") as stream:
            values = tomllib.load(stream)
    except tomllib.TOMLDecodeError as error:
        raise EndpointError(f"{path}: not a TOML file ({error}); expected [endpoints.NAME] tables") from None
    except OSError as error:
        raise EndpointError(f"{path}: cannot read the endpoints file ({error.strerror})") from None
    tables = values.get("endpoints", {})
    if set(values) - {"endpoints"} or not isinstance(tables, dict):
        raise EndpointError(f"{path}: expected only an [endpoints] table, one [endpoints.NAME] per endpoint")
    by_name = dict(BUILTIN_ENDPOINTS)
    for name, table in tables.items():
        by_name[name] = _endpoint_from_table(path, name, table)
    return Endpoints(by_name, str(path))


def _endpoint_from_table(path: Path, name: str, table: object) -> Endpoint:
    where = f"{path}: endpoint {name!r}"
    if not _ENDPOINT_NAME.match(name):
        raise EndpointError(f"{path}: endpoint name {name!r}: expected letters, digits, '.', '_' or '-'")
    if not isinstance(table, dict):
        raise EndpointError(f"{where}: expected a table with base_url (and optionally api_key_env, api)")
    unknown = sorted(set(table) - set(_ENDPOINT_FIELDS))
    if unknown:
        raise EndpointError(f"{where}: unknown field {unknown[0]!r}; expected {', '.join(_ENDPOINT_FIELDS)}")
    for field in _ENDPOINT_FIELDS:
        if field in table and not isinstance(table[field], str):
            raise EndpointError(f"{where}: {field} must be a string")
    base_url = table.get("base_url", "").strip()
    if not base_url:
        raise EndpointError(f"{where}: base_url is missing; expected e.g. base_url = \"https://host/v1\"")
    if not is_http_url(base_url):
        raise EndpointError(f"{where}: base_url must be an http(s) URL such as https://host/v1")
    if "@" in urlsplit(base_url).netloc:
        raise EndpointError(f"{where}: credentials in base_url; keep the key in an environment variable and name "
                            "it in api_key_env")
    api_key_env = table.get("api_key_env", "").strip()
    if api_key_env:
        check_env_name(api_key_env, f"{where}: api_key_env")
        problem = key_transport_problem(base_url)
        if problem:
            raise EndpointError(f"{where}: {problem}")
    api = table.get("api", "").strip()
    if api and api not in APIS:
        raise EndpointError(f"{where}: api {api!r}; expected one of {', '.join(APIS)}")
    return Endpoint(name, base_url, api_key_env, api)


# --- a workflow's choice -------------------------------------------------------------------------------------


def route_for_workflow(base_url: str, api_key_env: str, api: str, endpoints: Endpoints) -> Route:
    """Where an untrusted workflow's requests go, and with which key; refuses any choice of key it may not make.

    ``api`` is checked against an endpoint that serves one API only.

    ``base_url`` names a configured endpoint or holds a URL; a URL that is a configured endpoint's
    is that endpoint. ``api_key_env`` may be empty (the endpoint's own key, or none for an ad-hoc
    URL) or the endpoint's own variable, which is what saved workflows hold; anything else is refused.
    """
    value, api_key_env = base_url.strip(), api_key_env.strip()
    if api_key_env:
        check_env_name(api_key_env)
    configured = ", ".join(sorted(endpoints.by_name))
    endpoint = endpoints.by_name.get(value)
    if endpoint is None and is_http_url(value):
        matching = [candidate for candidate in endpoints.by_name.values() if same_url(candidate.base_url, value)]
        if api_key_env:
            matching = [candidate for candidate in matching if candidate.api_key_env == api_key_env] or matching
        if len(matching) > 1:
            raise EndpointError(f"base_url: {redact_url(value)} is the URL of several configured endpoints "
                                f"({', '.join(candidate.name for candidate in matching)}; set in {endpoints.source}); "
                                "name one of them in base_url")
        endpoint = matching[0] if matching else None
    if endpoint is None:
        if not is_http_url(value):
            shown = repr(value) if _ENDPOINT_NAME.match(value) else "the value given (not shown)"
            raise EndpointError(f"base_url: {shown} is neither an endpoint configured on this server (configured: "
                                f"{configured}; {endpoints.source}) nor an http(s) URL")
        if api_key_env:
            raise EndpointError(f"api_key_env: {api_key_env}: a workflow cannot send a key to a URL it names, and "
                                f"{redact_url(value)} is no endpoint configured on this server (configured: "
                                f"{configured}; {endpoints.source}). Leave api_key_env empty to call this URL "
                                "without a key, or ask the server's owner to add it to the endpoints file")
        return Route(value, "", "")
    if api_key_env and api_key_env != endpoint.api_key_env:
        bound = endpoint.api_key_env or "no key"
        raise EndpointError(f"api_key_env: {api_key_env} is not the key of endpoint {endpoint.name!r}: this server "
                            f"binds {bound} to it ({endpoints.source}), and a workflow cannot choose which key is "
                            "sent. Leave api_key_env empty to use the endpoint's own key")
    if endpoint.api and api != endpoint.api:
        raise EndpointError(f"api: {api!r}, but endpoint {endpoint.name!r} serves the {endpoint.api} API (set in "
                            f"{endpoints.source}); set api to {endpoint.api}")
    return Route(endpoint.base_url, endpoint.api_key_env, endpoint.name)
