"""Configuration files: ``cortex.toml``, ``models.toml`` and ``neuron.toml``.

Every file is structured into attrs classes by a strict cattrs converter: an unknown key or a wrong
type fails with a :class:`ConfigError` that names the file, the key path and what was expected,
because a typo in a config that is silently ignored costs an operator an evening.

Secrets never live in these files: a source names the *environment variable* that holds its token.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from cortex.source import ModelIdError, ModelSourceId, SourceDefaults, SourceSettings

T = TypeVar("T")

HUGGINGFACE = "huggingface"
HUGGINGFACE_ENDPOINT = "https://huggingface.co"
HUGGINGFACE_AUTH_ENV = "HF_TOKEN"


class ConfigError(ValueError):
    """A config file that cannot be used. The message names the file and the key path."""


# --------------------------------------------------------------------------------------------
# Small value types
# --------------------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@attrs.frozen
class Duration:
    """A length of time from a config: ``"10m"``, ``"1h30m"``, ``"45s"``, a number of seconds,
    or ``-1`` / ``"never"`` for no limit (``seconds is None``)."""

    seconds: float | None

    @classmethod
    def parse(cls, value: Any) -> Duration:
        if isinstance(value, Duration):
            return value
        if isinstance(value, bool):
            raise ValueError(f"expected a duration like '10m' or -1, got {value!r}")
        if isinstance(value, int | float):
            if value == -1:
                return cls(None)
            if value < 0:
                raise ValueError(f"a duration cannot be negative (use -1 for never): {value!r}")
            return cls(float(value))
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("-1", "never"):
                return cls(None)
            pos, total = 0, 0.0
            for match in _DURATION_PART.finditer(text):
                if match.start() != pos:
                    break
                total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
                pos = match.end()
            if pos == len(text) and text:
                return cls(total)
        raise ValueError(f"expected a duration like '10m', '1h30m', '45s' or -1, got {value!r}")

    @property
    def never(self) -> bool:
        return self.seconds is None

    def __str__(self) -> str:
        return "never" if self.seconds is None else f"{self.seconds:g}s"


def to_duration(value: Any) -> Duration:
    """:meth:`Duration.parse` as a plain function (an attrs converter a type checker reads)."""
    return Duration.parse(value)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    port_number = int(port)
    if not 0 <= port_number <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host.strip("[]"), port_number


def _check_listen(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    parse_listen(value)


def _check_model_id(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    ModelSourceId.parse(value)


# --------------------------------------------------------------------------------------------
# Listeners: TLS and header limits (gateway and neuron alike)
# --------------------------------------------------------------------------------------------

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_HEADER_BYTES = 32 * 1024


def _check_tls_pair(instance: Any, _attribute: attrs.Attribute, _value: Any) -> None:
    if (instance.certfile is None) != (instance.keyfile is None):
        raise ValueError("certfile and keyfile go together (set both or neither)")


@attrs.frozen
class ServerTls:
    """``[gateway.tls]`` / ``[tls]`` in neuron.toml: serve HTTPS with uvicorn's certificate
    options. ``client_ca_file`` additionally requires every caller to present a certificate
    signed by that CA (mutual TLS). Relative paths are taken from the config file's folder."""

    certfile: str | None = attrs.field(default=None, validator=_check_tls_pair)
    keyfile: str | None = None
    client_ca_file: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.client_ca_file is not None and self.certfile is None:
            raise ValueError("client_ca_file needs certfile and keyfile (TLS must be on)")

    @property
    def enabled(self) -> bool:
        return self.certfile is not None


@attrs.frozen
class NeuronTls:
    """``[neuron_tls]`` in cortex.toml: how the gateway checks ``https://`` neurons.
    ``ca_file``: the CA that signed the neurons' certificates (default: the system's trust
    store); ``certfile``/``keyfile``: the gateway's client certificate, for neurons that
    require one (their ``client_ca_file``)."""

    ca_file: str | None = None
    certfile: str | None = attrs.field(default=None, validator=_check_tls_pair)
    keyfile: str | None = None


def _positive_duration(_instance: Any, attribute: attrs.Attribute, value: Duration) -> None:
    if value.seconds is None or value.seconds <= 0:
        raise ValueError(f"{attribute.name} must be a positive duration, got {value}")


# --------------------------------------------------------------------------------------------
# cortex.toml
# --------------------------------------------------------------------------------------------


@attrs.frozen
class GatewaySection:
    listen: str = attrs.field(default="0.0.0.0:31313", validator=_check_listen)
    # Loopback by default: the metrics port has no client keys (docs/security.md); to scrape
    # from another host, listen on it and set [auth] metrics_token_env.
    metrics_listen: str = attrs.field(default="127.0.0.1:31314", validator=_check_listen)
    # HTTPS for clients (docs/security.md): certfile + keyfile, optional client_ca_file.
    tls: ServerTls = attrs.field(factory=ServerTls)
    # Slow or huge request headers (docs/security.md): 408 / 431 and the connection closed.
    header_timeout: Duration = attrs.field(
        default=Duration(DEFAULT_HEADER_TIMEOUT),
        converter=to_duration,
        validator=_positive_duration,
    )
    max_header_bytes: int = attrs.field(
        default=DEFAULT_MAX_HEADER_BYTES, validator=attrs.validators.ge(1024)
    )
    # The scheme of bare ids clients send; unset = what the healthy neurons report.
    default_source: str | None = None
    # Fleet poller: how often each neuron is asked, and after how many misses in a row it is down.
    poll_interval: Duration = attrs.field(default=Duration(2.0), converter=to_duration)
    down_after_failures: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    # Proxy: connecting to a neuron, and the longest silence between two chunks of an answer
    # (an idle timeout, never a total one: a long stream that keeps producing is never cut).
    connect_timeout: Duration = attrs.field(default=Duration(5.0), converter=to_duration)
    idle_timeout: Duration = attrs.field(default=Duration(300.0), converter=to_duration)
    # How long a request waits for a cold load (its own or one already running).
    load_timeout: Duration = attrs.field(default=Duration(600.0), converter=to_duration)
    # Retry-After (seconds) on retryable errors the gateway makes itself.
    retry_after: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    # Request bodies over this many bytes get 413 before they are read whole.
    max_body_bytes: int = attrs.field(default=32 * 2**20, validator=attrs.validators.gt(0))
    # Overload: requests per model in flight, the queue behind them (429 when full), how long
    # one may wait there (then 503), and requests per neuron in flight (503 when every replica
    # is at it). docs/reliability.md.
    max_in_flight_per_model: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    model_queue_size: int = attrs.field(default=512, validator=attrs.validators.ge(0))
    queue_timeout: Duration = attrs.field(default=Duration(60.0), converter=to_duration)
    max_in_flight_per_node: int = attrs.field(default=512, validator=attrs.validators.ge(1))
    # Anthropic / Responses streams: a ping (keep-alive) after this long without output, also
    # while a cold load or a queue delays the answer (docs/clients.md).
    stream_keepalive: Duration = attrs.field(default=Duration(10.0), converter=to_duration)
    # Tools only the API provider's servers can run (web_search, file_search, Anthropic's server
    # tools) on /v1/responses and /v1/messages: "drop" leaves them out, logs them and names them
    # in an x-cortex-dropped-tools header (Codex sends web_search on every request); "refuse"
    # answers 400 unsupported_tool (docs/clients.md).
    hosted_tools: str = attrs.field(
        default="drop", validator=attrs.validators.in_(("drop", "refuse"))
    )
    # The fleet dashboard at /ui (docs/operators.md): "off" serves nothing, "read-only" shows
    # the fleet to any valid key, "admin" also offers load/unload/pin to admin keys.
    dashboard: str = attrs.field(
        default="off", validator=attrs.validators.in_(("off", "read-only", "admin"))
    )


@attrs.frozen
class EvictionSection:
    strategy: str = "lru"
    defrag_after_cycles: int = attrs.field(default=50, validator=attrs.validators.ge(0))


@attrs.frozen
class AuthSection:
    """``[auth]``: who may call the gateway (docs/security.md). Secrets never live here: the
    config names environment variables holding keys, or a file of *hashed* keys."""

    # Client API keys: an env var with comma-separated keys and/or a file of sha256 hashes.
    keys_env: str | None = None
    keys_file: str | None = None
    # Keys for /admin/* (and model load/unload): the same two forms.
    admin_keys_env: str | None = None
    admin_keys_file: str | None = None
    # The env var holding the token the gateway sends to neurons (same name in neuron.toml).
    neuron_token_env: str | None = None
    # The env var holding the bearer token the metrics listener requires (Prometheus sends it
    # with ``authorization: {credentials_file: ...}``); unset: the metrics port is open.
    metrics_token_env: str | None = None
    # None: keys are required when configured, and a non-loopback listener without keys warns.
    required: bool | None = None


@attrs.frozen
class UsageSection:
    """``[usage]``: where usage per key and model is kept (docs/operators.md). Only requests
    with a key are accounted, so nothing is written while auth is off."""

    # "sqlite" (a file, the default), "postgres" (one database for several gateways: usage and
    # the limit counters, so they enforce one budget), or "off" (limits still apply, from
    # memory; nothing survives a restart).
    store: str = attrs.field(
        default="sqlite", validator=attrs.validators.in_(("sqlite", "postgres", "off"))
    )
    # The SQLite file (relative: from the config file's folder); unset: usage.db in
    # $CORTEX_STATE_DIR, else $XDG_STATE_HOME/cortex, else ~/.local/state/cortex.
    path: str | None = None
    # The env var holding the PostgreSQL connection string (it may hold a password).
    dsn_env: str = "CORTEX_USAGE_DSN"
    # How often usage is written and the shared counters are read (off the request path).
    flush_interval: Duration = attrs.field(
        default=Duration(1.0), converter=to_duration, validator=_positive_duration
    )


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """Where the gateway keeps state by default (the usage database)."""
    if environ.get("CORTEX_STATE_DIR"):
        return Path(environ["CORTEX_STATE_DIR"]).expanduser()
    if environ.get("XDG_STATE_HOME"):
        return Path(environ["XDG_STATE_HOME"]).expanduser() / "cortex"
    return Path("~/.local/state/cortex").expanduser()


@attrs.frozen
class NeuronRef:
    name: str
    endpoint: str


@attrs.frozen
class CortexConfig:
    gateway: GatewaySection = attrs.field(factory=GatewaySection)
    eviction: EvictionSection = attrs.field(factory=EvictionSection)
    auth: AuthSection = attrs.field(factory=AuthSection)
    usage: UsageSection = attrs.field(factory=UsageSection)
    neurons: list[NeuronRef] = attrs.field(factory=list)
    # How the gateway verifies https:// neurons (and its client certificate for them).
    neuron_tls: NeuronTls = attrs.field(factory=NeuronTls)
    models_config: str = "models.toml"
    base_dir: Path = attrs.field(default=Path("."), metadata={"file": False})

    def usage_path(self, environ: Mapping[str, str] | None = None) -> Path:
        """The SQLite usage file: ``[usage] path`` (relative to the config's folder), else
        ``usage.db`` in the state directory (:func:`default_state_dir`)."""
        environ = os.environ if environ is None else environ
        if self.usage.path:
            path = Path(self.usage.path).expanduser()
            return path if path.is_absolute() else self.base_dir / path
        return default_state_dir(environ) / "usage.db"

    @property
    def models_config_path(self) -> Path:
        """``models_config`` resolved relative to the directory of the config file."""
        path = Path(self.models_config)
        return path if path.is_absolute() else self.base_dir / path


# --------------------------------------------------------------------------------------------
# models.toml
# --------------------------------------------------------------------------------------------


@attrs.frozen
class ModelProfile:
    """How the gateway treats one model: where it may run, how big it is, how long it stays."""

    id: str = attrs.field(validator=_check_model_id)
    harness: str | None = None
    quant: str | None = None
    memory_mb: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0))
    )
    priority: int = 0
    pinned: bool = False
    nodes: list[str] = attrs.field(factory=list)
    keep_alive: Duration = attrs.field(default=Duration(None), converter=to_duration)
    # continuous batching capacity of a load (docs/neuron.md#the-scheduler); unset: the
    # device's max_batch and a KV cache of max_batch x 1024 tokens
    max_batch: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0))
    )
    kv_tokens: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0))
    )
    # the context a replica is loaded with (the neuron's load ``context_length``); unset: the
    # model's own (config.json, the GGUF's metadata capped by the harness's max_context)
    context_length: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0))
    )
    # how many devices of one node a replica spans (tensor parallel; docs/harnesses.md);
    # unset: one. memory_mb is the whole replica's, split evenly over them.
    devices: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0))
    )


@attrs.frozen
class ModelsConfig:
    models: list[ModelProfile] = attrs.field(factory=list)
    aliases: dict[str, str] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        for alias, target in self.aliases.items():
            try:
                ModelSourceId.parse(target)
            except ModelIdError as exc:
                raise ValueError(f"alias {alias!r}: {exc}") from None


# --------------------------------------------------------------------------------------------
# neuron.toml
# --------------------------------------------------------------------------------------------


@attrs.frozen
class SourceSection:
    """``[sources.<scheme>]``: unset fields take the serving plugin's defaults."""

    endpoint: str | None = None
    auth_env: str | None = None
    cache_dir: str | None = None
    plugin: str | None = None


@attrs.frozen
class DefaultModel:
    """``[[default_models]]``: loaded in the background once the listener is up."""

    id: str = attrs.field(validator=_check_model_id)
    harness: str | None = None
    quant: str | None = None
    device: str | None = None


@attrs.frozen
class DeviceSettings:
    """``[devices."cpu"]`` / ``[devices."cuda:0"]``: per-device limits."""

    memory_mb: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0))
    )
    max_queue: int = attrs.field(default=64, validator=attrs.validators.gt(0))
    # Continuous batching (docs/neuron.md#the-scheduler): the most generations of one model that
    # run at once on this device, unless its load names another ``max_batch``; and the tokens one
    # scheduler iteration evaluates (one per running generation, the rest for prompt chunks).
    max_batch: int = attrs.field(default=32, validator=attrs.validators.gt(0))
    max_batch_tokens: int = attrs.field(default=512, validator=attrs.validators.gt(0))


@attrs.frozen
class NeuronConfig:
    listen: str = attrs.field(default="0.0.0.0:13131", validator=_check_listen)
    name: str | None = None
    default_source: str = HUGGINGFACE
    hf_cache: str | None = None
    sources: dict[str, SourceSection] = attrs.field(factory=dict)
    default_models: list[DefaultModel] = attrs.field(factory=list)
    devices: dict[str, DeviceSettings] = attrs.field(factory=dict)
    # The env var holding the shared gateway<->neuron token; when set, lifecycle and generation
    # calls without it get 401 (``/health`` stays open). See docs/security.md.
    token_env: str | None = None
    # Request bodies over this many bytes get 413 before they are read whole.
    max_body_bytes: int = attrs.field(default=32 * 2**20, validator=attrs.validators.gt(0))
    # HTTPS for the gateway's calls (docs/security.md): certfile + keyfile; client_ca_file
    # requires the gateway's client certificate.
    tls: ServerTls = attrs.field(factory=ServerTls)
    # Slow or huge request headers: 408 / 431 and the connection closed (docs/security.md).
    header_timeout: Duration = attrs.field(
        default=Duration(DEFAULT_HEADER_TIMEOUT),
        converter=to_duration,
        validator=_positive_duration,
    )
    max_header_bytes: int = attrs.field(
        default=DEFAULT_MAX_HEADER_BYTES, validator=attrs.validators.ge(1024)
    )
    # What a poisoned device does (docs/neuron.md): "exit" ends the process with status 75
    # once other work drained, for the service manager to restart it; "stay" keeps serving
    # the other devices and refuses work for the dead one.
    on_device_fault: str = attrs.field(
        default="exit", validator=attrs.validators.in_(("exit", "stay"))
    )
    base_dir: Path = attrs.field(default=Path("."), metadata={"file": False})


def huggingface_cache_dir(hf_cache: str | None, environ: Mapping[str, str]) -> Path:
    """The Hugging Face cache: legacy ``hf_cache``, then ``HF_HUB_CACHE``, then
    ``HF_HOME/hub``, then ``~/.cache/huggingface/hub`` (what huggingface_hub itself uses)."""
    if hf_cache:
        return Path(hf_cache).expanduser()
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def cortex_cache_dir(scheme: str, environ: Mapping[str, str]) -> Path:
    """Default cache for a non-huggingface scheme: its own folder, never the HF cache."""
    base = environ.get("CORTEX_CACHE") or str(Path("~/.cache/cortex").expanduser())
    return Path(base).expanduser() / "sources" / scheme


def effective_sources(
    config: NeuronConfig,
    plugin_defaults: Mapping[str, tuple[str, SourceDefaults]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, SourceSettings]:
    """The sources a neuron actually uses, one per scheme.

    ``plugin_defaults`` maps a scheme to (plugin name, its defaults) for every installed source
    plugin. Explicit ``[sources.<scheme>]`` tables win field by field; schemes nobody configured
    get their plugin's defaults; ``huggingface`` is always present (synthesised with the legacy
    ``hf_cache`` when not configured). Only ``huggingface`` falls back to the HF env vars.
    """
    environ = os.environ if environ is None else environ
    plugin_defaults = plugin_defaults or {}
    result: dict[str, SourceSettings] = {}

    def cache_for(scheme: str, explicit: str | None, default: SourceDefaults | None) -> Path:
        if explicit:
            path = Path(explicit).expanduser()
            return path if path.is_absolute() else config.base_dir / path
        if scheme == HUGGINGFACE:
            return huggingface_cache_dir(config.hf_cache, environ)
        if default is not None:
            return default.cache_dir
        return cortex_cache_dir(scheme, environ)

    for scheme, section in config.sources.items():
        plugin = section.plugin or (
            plugin_defaults[scheme][0] if scheme in plugin_defaults else scheme
        )
        default = None
        if scheme in plugin_defaults and plugin_defaults[scheme][0] == plugin:
            default = plugin_defaults[scheme][1]
        endpoint = section.endpoint or (default.endpoint if default else None)
        if endpoint is None and scheme == HUGGINGFACE:
            endpoint = HUGGINGFACE_ENDPOINT
        if endpoint is None:
            raise ConfigError(
                f"[sources.{scheme}] needs an 'endpoint' (no installed plugin provides a default)"
            )
        auth_env = section.auth_env
        if auth_env is None:
            auth_env = default.auth_env if default else None
        if auth_env is None and scheme == HUGGINGFACE:
            auth_env = HUGGINGFACE_AUTH_ENV
        result[scheme] = SourceSettings(
            scheme=scheme,
            endpoint=endpoint.rstrip("/"),
            auth_env=auth_env,
            cache_dir=cache_for(scheme, section.cache_dir, default),
            plugin=plugin,
        )

    if HUGGINGFACE not in result:
        hf_plugin = plugin_defaults.get(HUGGINGFACE, (HUGGINGFACE, None))[0]
        result[HUGGINGFACE] = SourceSettings(
            scheme=HUGGINGFACE,
            endpoint=HUGGINGFACE_ENDPOINT,
            auth_env=HUGGINGFACE_AUTH_ENV,
            cache_dir=huggingface_cache_dir(config.hf_cache, environ),
            plugin=hf_plugin,
        )
    for scheme, (plugin, default) in plugin_defaults.items():
        if scheme in result:
            continue
        result[scheme] = SourceSettings(
            scheme=scheme,
            endpoint=default.endpoint.rstrip("/"),
            auth_env=default.auth_env,
            cache_dir=default.cache_dir,
            plugin=plugin,
        )
    _check_distinct_caches(result)
    return result


def _check_distinct_caches(sources: Mapping[str, SourceSettings]) -> None:
    """Two schemes sharing a cache dir would overwrite each other's ``refs/main``: refuse it."""
    seen: dict[Path, str] = {}
    for scheme, settings in sources.items():
        key = settings.cache_dir.expanduser().resolve()
        if key in seen:
            raise ConfigError(
                f"sources {seen[key]!r} and {scheme!r} share the cache dir {settings.cache_dir}; "
                "each registry needs its own cache (the same org/name differs between registries)"
            )
        seen[key] = scheme


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(Duration, lambda value, _type: Duration.parse(value))
    converter.register_unstructure_hook(Duration, lambda d: -1 if d.seconds is None else d.seconds)

    def structure_str(value: Any, _type: type) -> str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__} {value!r}")
        return value

    def structure_int(value: Any, _type: type) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")
        return value

    def structure_bool(value: Any, _type: type) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {type(value).__name__} {value!r}")
        return value

    converter.register_structure_hook(str, structure_str)
    converter.register_structure_hook(int, structure_int)
    converter.register_structure_hook(bool, structure_bool)
    return converter


converter = _make_converter()


def _describe_errors(exc: BaseException, path: str) -> list[str]:
    """Flatten a cattrs error tree into ``key.path: what was wrong`` lines."""
    lines: list[str] = []
    if isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields):
            where = f"{path}.{key}" if path else key
            lines.append(f"{where}: unknown key")
        return lines
    if isinstance(exc, cattrs.BaseValidationError):
        for sub in exc.exceptions:
            note = _note_of(sub)
            sub_path = f"{path}.{note}" if path and note else (note or path)
            lines.extend(_describe_errors(sub, sub_path))
        return lines
    lines.append(f"{path or '(top level)'}: {exc}")
    return lines


def _note_of(exc: BaseException) -> str:
    for note in getattr(exc, "__notes__", []):
        name = getattr(note, "name", None)
        if name is None:
            index = getattr(note, "index", None)
            if index is not None:
                return f"[{index}]" if not isinstance(index, str) else str(index)
            continue
        return str(name)
    return ""


def structure_config(data: Mapping[str, Any], cls: type[T], source: str) -> T:
    """Structure ``data`` into ``cls``; every failure becomes one :class:`ConfigError`."""
    try:
        return converter.structure(dict(data), cls)
    except (ClassValidationError, ForbiddenExtraKeysError, cattrs.BaseValidationError) as exc:
        lines = _describe_errors(exc, "")
        raise ConfigError(f"{source}: " + "; ".join(lines).replace(".[", "[")) from None
    except (ValueError, TypeError, ModelIdError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _load(path: Path, cls: type[T]) -> T:
    data = _read_toml(path)
    if "base_dir" in data:
        raise ConfigError(f"{path}: base_dir: unknown key")
    loaded = structure_config(data, cls, str(path))
    if attrs.has(cls) and "base_dir" in attrs.fields_dict(cls):
        loaded = attrs.evolve(loaded, base_dir=path.resolve().parent)  # type: ignore[misc]
    return loaded


def load_cortex_config(path: str | Path | None) -> CortexConfig:
    """Load ``cortex.toml``; None gives the defaults."""
    return CortexConfig() if path is None else _load(Path(path), CortexConfig)


def load_models_config(path: str | Path | None) -> ModelsConfig:
    """Load ``models.toml``; None or a missing default file gives an empty catalogue."""
    return ModelsConfig() if path is None else _load(Path(path), ModelsConfig)


def load_neuron_config(path: str | Path | None) -> NeuronConfig:
    """Load ``neuron.toml``; None gives the defaults."""
    return NeuronConfig() if path is None else _load(Path(path), NeuronConfig)
