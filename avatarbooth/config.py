"""Read config.toml (and the environment) into each package's settings.

Precedence, highest first: command-line flags (``--preset``), environment variables
(``AVATARBOOTH_DATA``, ``AVATARBOOTH_REDIS_URL``), config.toml, built-in defaults. Secrets never come
from config.toml: tokens and passwords are read from the environment (or a ``.env`` file) only.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bot.discord.settings import DiscordSettings
from bot.settings import BotSettings
from bot.telegram.settings import TelegramSettings
from bot.safety import BlocklistFileError, PromptBlocklist, load_blocklist
from engine.settings import EngineSettings
from storage.blobs import BLOB_STORES, BlobStoreSettings
from storage.errors import StorageError

DEFAULT_CONFIG = Path("config.toml")
_S = TypeVar("_S")
KNOWN_PRESETS = ("sdxl", "sd15", "tiny", "tiny-sd15")


class ConfigError(Exception):
    """config.toml or the environment holds something we cannot use; the message says what to fix."""


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics]``: where `avatarbooth run` and `avatarbooth worker` serve /metrics and /healthz
    (docs/operations.md). A port of None is off; both are off unless config.toml sets them."""

    host: str = "127.0.0.1"
    port: int | None = None  # the chat side (`avatarbooth run`)
    worker_port: int | None = None  # each worker (`avatarbooth worker`; `--metrics-port` overrides)


@dataclass(frozen=True)
class AppConfig:
    config_path: Path | None
    data_dir: Path
    redis_url: str | None  # None: start the embedded Valkey server
    bot: BotSettings
    engine: EngineSettings
    blob_store: BlobStoreSettings
    base_model: str | None = None  # a Hub repo id that `models pull` fetches in place of the preset's base
    telegram: TelegramSettings = TelegramSettings()
    discord: DiscordSettings = DiscordSettings()
    blocklist: PromptBlocklist | None = None  # None: the built-in list
    metrics: MetricsSettings = MetricsSettings()

    @property
    def database_path(self) -> Path:
        return self.data_dir / "avatarbooth.sqlite3"

    @property
    def valkey_dir(self) -> Path:
        return self.data_dir / "valkey"

    def with_redis_url(self, url: str) -> AppConfig:
        """The same configuration, pointed at a running Redis/Valkey (e.g. the embedded one)."""
        engine = dataclasses.replace(self.engine, redis_url=url)
        return dataclasses.replace(self, redis_url=url, engine=engine)


_SECTIONS = {
    "storage", "queue", "engine", "limits", "identity", "training", "telegram", "discord", "safety", "metrics",
}
_ENGINE_KEYS = {
    "preset", "device", "dtype", "models_dir", "preview_steps", "draw_steps", "face_detail", "base_model",
    "dreambooth_cache_gib", "lora_hotswap", "hotswap_rank", "compile_unet",
    "few_step", "resident_loras",
}
_DTYPES = ("auto", "float16", "bfloat16", "float32")  # engine.pipelines.base.RESIDENT_DTYPES, without importing torch
_DREAMBOOTH_OPTIMIZERS = ("adamw", "adafactor")


def load_config(
    path: Path | None = None,
    *,
    preset: str | None = None,
    env: Mapping[str, str] | None = None,
) -> AppConfig:
    """Build the whole configuration. ``path=None`` uses ./config.toml when present, else defaults."""
    env = os.environ if env is None else env
    raw, base_dir = _read_toml(path)
    unknown = set(raw) - _SECTIONS
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; known: {sorted(_SECTIONS)}")

    data_dir = _data_dir(_section(raw, "storage"), base_dir, env)
    blob_store = _blob_store_settings(_section(raw, "storage"), data_dir)
    redis_url = env.get("AVATARBOOTH_REDIS_URL") or _section(raw, "queue").get("redis_url") or None
    engine = _engine_settings(raw, data_dir, redis_url or "", preset, blob_store)
    return AppConfig(
        config_path=path,
        data_dir=data_dir,
        redis_url=redis_url,
        bot=_bot_settings(raw),
        engine=engine,
        blob_store=blob_store,
        base_model=_base_model(_section(raw, "engine")),
        telegram=_table_settings(TelegramSettings, "telegram", _section(raw, "telegram")),
        discord=_table_settings(DiscordSettings, "discord", _section(raw, "discord")),
        blocklist=_blocklist(_section(raw, "safety"), base_dir),
        metrics=_metrics_settings(_section(raw, "metrics")),
    )


def read_dotenv(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a .env file (``#`` comments, optional quotes); {} when there is none."""
    if not path.is_file():
        return {}
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def secret(name: str, env: Mapping[str, str], dotenv: Path = Path(".env")) -> str | None:
    """A secret (bot token, password) from the environment, else from ``.env``; never from config."""
    return env.get(name) or read_dotenv(dotenv).get(name) or None


def _read_toml(path: Path | None) -> tuple[dict[str, Any], Path]:
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return {}, Path.cwd()
        path = DEFAULT_CONFIG
    try:
        with path.open("rb") as f:
            return tomllib.load(f), path.resolve().parent
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass --config with an existing file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e


def _section(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _data_dir(storage: Mapping[str, Any], base_dir: Path, env: Mapping[str, str]) -> Path:
    configured = env.get("AVATARBOOTH_DATA") or storage.get("data_dir") or "data"
    data_dir = Path(str(configured)).expanduser()
    # A relative data_dir in config.toml is relative to that file, not to wherever the command runs.
    if not data_dir.is_absolute() and not env.get("AVATARBOOTH_DATA"):
        data_dir = base_dir / data_dir
    return data_dir.resolve()


_STORAGE_KEYS = {"data_dir", "blob_store", "s3_bucket", "s3_prefix", "blob_cache_gib"}
# Where S3 settings that never go in config.toml come from instead (boto3 reads them itself).
_STORAGE_FROM_ENV = {
    "endpoint": "AWS_ENDPOINT_URL", "endpoint_url": "AWS_ENDPOINT_URL", "s3_endpoint": "AWS_ENDPOINT_URL",
    "s3_endpoint_url": "AWS_ENDPOINT_URL", "region": "AWS_DEFAULT_REGION", "s3_region": "AWS_DEFAULT_REGION",
    "access_key": "AWS_ACCESS_KEY_ID", "access_key_id": "AWS_ACCESS_KEY_ID", "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "s3_access_key": "AWS_ACCESS_KEY_ID", "s3_access_key_id": "AWS_ACCESS_KEY_ID", "secret_key": "AWS_SECRET_ACCESS_KEY",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "s3_secret_key": "AWS_SECRET_ACCESS_KEY", "s3_secret_access_key": "AWS_SECRET_ACCESS_KEY",
}
_DEFAULT_BLOB_CACHE_GIB = 20


def _blob_store_settings(storage: Mapping[str, Any], data_dir: Path) -> BlobStoreSettings:
    for key in storage:
        if key.lower() in _STORAGE_FROM_ENV:
            raise ConfigError(
                f"[storage] {key}: S3 endpoints, regions and keys never go in config.toml; set "
                f"{_STORAGE_FROM_ENV[key.lower()]} in the environment (boto3 reads it)"
            )
    unknown = set(storage) - _STORAGE_KEYS
    if unknown:
        raise ConfigError(f"[storage] unknown setting(s) {sorted(unknown)}; known: {', '.join(sorted(_STORAGE_KEYS))}")
    kind = storage.get("blob_store", "local")
    if kind not in BLOB_STORES:
        raise ConfigError(f'[storage] blob_store must be "local" (files under data_dir) or "s3", got {kind!r}')
    bucket, prefix = storage.get("s3_bucket", ""), storage.get("s3_prefix", "")
    for key, value in (("s3_bucket", bucket), ("s3_prefix", prefix)):
        if not isinstance(value, str):
            raise ConfigError(f"[storage] {key} must be a string, got {value!r}")
    if kind == "s3" and not bucket:
        raise ConfigError(
            '[storage] blob_store = "s3" needs s3_bucket = "<an existing bucket>"; the endpoint, region and '
            "keys come from AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if kind == "local" and (bucket or prefix):
        raise ConfigError('[storage] s3_bucket and s3_prefix are used only with blob_store = "s3": set it, or remove them')
    gib = storage.get("blob_cache_gib", _DEFAULT_BLOB_CACHE_GIB)
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or gib <= 0:
        raise ConfigError(f"[storage] blob_cache_gib must be a number of GiB above 0, got {gib!r}")
    try:
        return BlobStoreSettings(
            local_dir=data_dir / "blobs", kind=kind, s3_bucket=bucket, s3_prefix=prefix,
            cache_dir=data_dir / "blob-cache", cache_bytes=int(gib * 2**30),
        )
    except (ValueError, StorageError) as e:
        raise ConfigError(f"[storage] {e}") from e


def _engine_settings(
    raw: Mapping[str, Any], data_dir: Path, redis_url: str, preset: str | None, blob_store: BlobStoreSettings
) -> EngineSettings:
    engine = _section(raw, "engine")
    queue = _section(raw, "queue")
    training = _section(raw, "training")
    unknown = set(engine) - _ENGINE_KEYS
    if unknown:
        raise ConfigError(f"[engine] unknown setting(s) {sorted(unknown)}; known: {sorted(_ENGINE_KEYS)}")
    chosen = preset or engine.get("preset", "sdxl")
    if chosen not in KNOWN_PRESETS:
        raise ConfigError(f"unknown preset {chosen!r}; choose one of: {', '.join(KNOWN_PRESETS)}")
    models_dir = Path(engine["models_dir"]).expanduser() if engine.get("models_dir") else data_dir / "models"
    return EngineSettings(
        preset=chosen,
        models_dir=models_dir,
        blobs_dir=data_dir / "blobs",
        redis_url=redis_url,
        blob_store=blob_store if blob_store.kind != "local" else None,
        device=str(engine.get("device", "auto")),
        dtype=_choice(engine, "engine", "dtype", _DTYPES),
        dreambooth_cache_bytes=_cache_bytes(engine),
        max_jobs=_positive_int(queue, "max_jobs", 4, where="[queue] "),
        resident_loras=_positive_int(engine, "resident_loras", EngineSettings.resident_loras, where="[engine] "),
        residency_wait_s=_residency_wait(queue),
        interactive_timeout_s=_positive_int(queue, "interactive_timeout_s", 300, where="[queue] "),
        training_timeout_s=_positive_int(queue, "training_timeout_s", 3600, where="[queue] "),
        train_steps=_optional_positive_int(training, "steps", where="[training] "),
        preview_steps=_optional_positive_int(engine, "preview_steps", where="[engine] "),
        draw_steps=_optional_positive_int(engine, "draw_steps", where="[engine] "),
        face_detail=bool(_bool(engine, "face_detail", True, where="[engine] ")),
        lora_hotswap=bool(_bool(engine, "lora_hotswap", False, where="[engine] ")),
        hotswap_rank=_positive_int(engine, "hotswap_rank", EngineSettings.hotswap_rank, where="[engine] "),
        compile_unet=bool(_bool(engine, "compile_unet", False, where="[engine] ")),
        few_step=bool(_bool(engine, "few_step", False, where="[engine] ")),
        random_flip=_bool(training, "random_flip", False, where="[training] "),
        train_text_encoder=_bool(training, "train_text_encoder", False, where="[training] "),
        gradient_checkpointing=_bool(training, "gradient_checkpointing", None, where="[training] "),
        dreambooth_optimizer=_choice(training, "training", "dreambooth_optimizer", _DREAMBOOTH_OPTIMIZERS),
        keep_best_by_likeness=_bool(training, "keep_best_by_likeness", False, where="[training] "),
    )


def _choice(table: Mapping[str, Any], section: str, key: str, allowed: tuple[str, ...]) -> str:
    """One of ``allowed`` (the first is the default when ``key`` is unset)."""
    value = table.get(key, allowed[0])
    if value not in allowed:
        raise ConfigError(f"[{section}] {key} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return str(value)


def _residency_wait(queue: Mapping[str, Any]) -> float:
    value = queue.get("residency_wait_s", EngineSettings.residency_wait_s)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 60:
        raise ConfigError(f"[queue] residency_wait_s must be seconds from 0 (off) to 60, got {value!r}")
    return float(value)


def _cache_bytes(engine: Mapping[str, Any]) -> int:
    default = EngineSettings.dreambooth_cache_bytes
    value = engine.get("dreambooth_cache_gib", default / 2**30)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"[engine] dreambooth_cache_gib must be a number of GiB, 0 or more, got {value!r}")
    return int(value * 2**30)


# config.toml name -> BotSettings field, per section.
_BOT_KEYS: dict[str, dict[str, str]] = {
    "limits": {
        "min_photos": "min_photos",
        "max_photos": "max_photos",
        "max_upload_bytes": "max_upload_bytes",
        "max_pixels": "max_pixels",
        "min_side": "min_side",
        "draws_per_hour": "draws_per_hour",
        "images_per_draw": "draw_num_images",
        "pack_best_of": "pack_best_of",
        "max_prompt_chars": "max_prompt_chars",
    },
    "identity": {"token": "token", "class_word": "class_word"},
    "training": {"enabled_methods": "enabled_methods"},
    "queue": {
        "interactive_timeout_s": "interactive_timeout_s",
        "training_timeout_s": "training_timeout_s",
    },
}
_ENGINE_ONLY = {
    "queue": {"redis_url", "max_jobs", "residency_wait_s"},
    "training": {"steps", "random_flip", "train_text_encoder", "gradient_checkpointing", "dreambooth_optimizer",
                 "keep_best_by_likeness"},
}


def _bot_settings(raw: Mapping[str, Any]) -> BotSettings:
    defaults = BotSettings()
    fields = {f.name for f in dataclasses.fields(BotSettings)}
    overrides: dict[str, Any] = {}
    for section, mapping in _BOT_KEYS.items():
        values = _section(raw, section)
        allowed = set(mapping) | _ENGINE_ONLY.get(section, set())
        for key, value in values.items():
            if key not in allowed:
                raise ConfigError(f"[{section}] {key}: unknown setting; known: {', '.join(sorted(allowed))}")
            if key in mapping and mapping[key] in fields:
                overrides[mapping[key]] = _coerce(section, key, value, getattr(defaults, mapping[key]))
    try:
        return dataclasses.replace(defaults, **overrides)
    except ValueError as exc:  # settings that are wrong together, e.g. min_photos > max_photos
        raise ConfigError(f"[limits] or [training]: {exc}; fix config.toml") from exc


def _base_model(engine: Mapping[str, Any]) -> str | None:
    value = engine.get("base_model") or None
    if value is not None and (not isinstance(value, str) or value.count("/") != 1 or " " in value):
        raise ConfigError(f"[engine] base_model must be a Hub repository id like 'owner/name', got {value!r}")
    return value


def _table_settings(cls: type[_S], section: str, table: Mapping[str, Any]) -> _S:
    """A frozen settings dataclass from one config table: every key known, every value checked."""
    if "token" in table:
        env = "TELEGRAM_TOKEN" if section == "telegram" else "DISCORD_TOKEN"
        raise ConfigError(f"[{section}] token: tokens never go in config.toml; set {env} in the environment or .env")
    defaults = cls()
    known = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"[{section}] {key}: unknown setting; known: {', '.join(sorted(known))}")
        values[key] = _coerce_value(section, key, value, known[key])
    try:
        return dataclasses.replace(defaults, **values)  # type: ignore[type-var]
    except (ValueError, TypeError) as e:
        raise ConfigError(f"[{section}] {e}") from e


def _coerce_value(section: str, key: str, value: Any, default: Any) -> Any:
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"[{section}] {key} must be a list, got {value!r}")
        return tuple(value)
    if default is None or isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int)):
        return value
    raise ConfigError(f"[{section}] {key} must be a {type(default).__name__}, got {value!r}")


def _metrics_settings(table: Mapping[str, Any]) -> MetricsSettings:
    unknown = set(table) - {"host", "port", "worker_port"}
    if unknown:
        raise ConfigError(f"[metrics] unknown setting(s) {sorted(unknown)}; known: host, port, worker_port")
    host = table.get("host", MetricsSettings.host)
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"[metrics] host must be an address to listen on, like \"127.0.0.1\", got {host!r}")
    port = checked_metrics_port(table.get("port"), "[metrics] port")
    worker_port = checked_metrics_port(table.get("worker_port"), "[metrics] worker_port")
    if port is not None and port == worker_port:  # `run` starts a worker beside itself, on the same host
        raise ConfigError(f"[metrics] port and worker_port are both {port}: give the worker another port")
    return MetricsSettings(host=host.strip(), port=port, worker_port=worker_port)


def checked_metrics_port(value: object, where: str) -> int | None:
    """A TCP port to serve metrics on, or None (off) for 0 or unset."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"{where} must be a TCP port (1-65535), or 0 for off, got {value!r}")
    return value


def _blocklist(table: Mapping[str, Any], base_dir: Path) -> PromptBlocklist | None:
    unknown = set(table) - {"blocklist_file", "extra_blocked_terms"}
    if unknown:
        raise ConfigError(f"[safety] unknown setting(s) {sorted(unknown)}; known: blocklist_file, extra_blocked_terms")
    file = table.get("blocklist_file")
    extra = table.get("extra_blocked_terms", [])
    if not file and not extra:
        return None
    if not isinstance(extra, list) or not all(isinstance(t, str) for t in extra):
        raise ConfigError("[safety] extra_blocked_terms must be a list of strings")
    path = base_dir / Path(str(file)).expanduser() if file else None
    try:
        return load_blocklist(path, extra)
    except BlocklistFileError as e:
        raise ConfigError(f"[safety] blocklist_file: {e}") from e


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"[{section}] {key} must be a list of strings, got {value!r}")
        return tuple(value)
    if isinstance(default, bool) or not isinstance(value, type(default)):
        raise ConfigError(f"[{section}] {key} must be a {type(default).__name__}, got {value!r}")
    if isinstance(value, int) and value <= 0:
        raise ConfigError(f"[{section}] {key} must be positive, got {value}")
    return value


def _positive_int(section: Mapping[str, Any], key: str, default: int, *, where: str = "") -> int:
    """``where``: the table, as "[engine] ", for the message."""
    value = section.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where}{key} must be a positive whole number, got {value!r}; fix config.toml")
    return value


def _bool(section: Mapping[str, Any], key: str, default: bool | None, *, where: str = "") -> bool | None:
    value = section.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{where}{key} must be true or false, got {value!r}; fix config.toml")
    return value


def _optional_positive_int(section: Mapping[str, Any], key: str, *, where: str = "") -> int | None:
    if section.get(key) in (None, 0):
        return None
    return _positive_int(section, key, 1, where=where)
