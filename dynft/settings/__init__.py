"""dynft's configuration: one pydantic-settings tree whose sections mirror the modules.

Values come, from lowest to highest precedence, from the defaults below, an optional
config file (TOML, YAML or JSON), environment variables ``DYNFT_<SECTION>__<FIELD>``
(``DYNFT_STATE_DIR`` for top-level fields) and CLI flags. Only this module reads the
environment.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from dynft.errors import InvalidSettingsError
from dynft.settings.files import nest, parse_assignment, read_config_file
from dynft.settings.intake import (
    CheckpointSettings,
    EventSettings,
    KafkaSettings,
    LedgerSettings,
    SourceSettings,
)
from dynft.settings.sections import (
    AdapterSettings,
    BufferSettings,
    DriftSettings,
    EvaluationSettings,
    GateSettings,
    ModelSettings,
    RegistrySettings,
    RunSettings,
    Section,
    ServerSettings,
    TasksSettings,
    TrainerSettings,
)

__all__ = [
    "SECRETS",
    "AdapterSettings",
    "BufferSettings",
    "CheckpointSettings",
    "DriftSettings",
    "EvaluationSettings",
    "EventSettings",
    "GateSettings",
    "KafkaSettings",
    "LedgerSettings",
    "ModelSettings",
    "RegistrySettings",
    "RunSettings",
    "Section",
    "ServerSettings",
    "Settings",
    "SourceSettings",
    "TasksSettings",
    "TrainerSettings",
    "format_validation_error",
    "is_secret_field",
    "load_settings",
    "nest",
    "parse_assignment",
    "read_config_file",
    "reference_table",
    "unknown_environment",
]


SECRETS = (("server", "admin_token"), ("kafka", "sasl_password"), ("kafka", "ssl_password"))


class Settings(BaseSettings):
    """The whole configuration of a dynft process."""

    model_config = SettingsConfigDict(
        env_prefix="DYNFT_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    state_dir: Path = Field(Path("dynft-state"), description="registry, dead letters and run files live here")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="logging threshold")

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v  # DYNFT_LOG_LEVEL=debug means DEBUG

    source: SourceSettings = Field(default_factory=SourceSettings)  # type: ignore[arg-type]
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)  # type: ignore[arg-type]
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)  # type: ignore[arg-type]
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)  # type: ignore[arg-type]
    events: EventSettings = Field(default_factory=EventSettings)  # type: ignore[arg-type]
    buffer: BufferSettings = Field(default_factory=BufferSettings)  # type: ignore[arg-type]
    model: ModelSettings = Field(default_factory=ModelSettings)  # type: ignore[arg-type]
    adapter: AdapterSettings = Field(default_factory=AdapterSettings)  # type: ignore[arg-type]
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)  # type: ignore[arg-type]
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)  # type: ignore[arg-type]
    drift: DriftSettings = Field(default_factory=DriftSettings)  # type: ignore[arg-type]
    registry: RegistrySettings = Field(default_factory=RegistrySettings)  # type: ignore[arg-type]
    gate: GateSettings = Field(default_factory=GateSettings)  # type: ignore[arg-type]
    server: ServerSettings = Field(default_factory=ServerSettings)  # type: ignore[arg-type]
    run: RunSettings = Field(default_factory=RunSettings)  # type: ignore[arg-type]
    tasks: TasksSettings = Field(default_factory=TasksSettings)  # type: ignore[arg-type]

    @field_validator("state_dir", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        """An empty path would be the working directory: say so instead of filling it with state."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty; name a directory (use . for the working directory)")
        return value

    @property
    def registry_dir(self) -> Path:
        return self.state_dir / "registry"

    @property
    def dead_letter_path(self) -> Path:
        return self.source.dead_letter_path or self.state_dir / "dead-letter.jsonl"

    @property
    def console_show_texts(self) -> bool:
        """``server.console_show_texts`` resolved: unset means on for the demo stream only (its texts are public)."""
        show = self.server.console_show_texts
        return self.source.uri == "demo" if show is None else show

    def public_dump(self) -> dict[str, Any]:
        """The configuration as plain data, with secrets masked."""
        return self._dump(reveal=False)

    def secret_dump(self) -> dict[str, Any]:
        """The configuration as plain data, secrets included (for child processes only)."""
        return self._dump(reveal=True)

    def _dump(self, reveal: bool) -> dict[str, Any]:
        data: dict[str, Any] = self.model_dump(mode="json")
        for section, key in SECRETS:
            secret = getattr(getattr(self, section), key)
            if secret is not None:
                data[section][key] = secret.get_secret_value() if reveal else "**********"
        return data


SECRET_WORDS = ("token", "pas", "pwd", "secret", "cred")  # an unknown field named like this may be a misspelt secret


def is_secret_field(loc: tuple[int | str, ...]) -> bool:
    """True when ``loc`` names a ``SecretStr`` setting, or an unknown one whose name suggests a secret.

    Decided by the field's type, so a secret added later (any ``SecretStr``) is masked too.

    >>> is_secret_field(("server", "admin_token")), is_secret_field(("server", "port"))
    (True, False)
    >>> is_secret_field(("kafka", "sasl_pasword"))  # a typo is an unknown field: still masked
    True
    """
    model: type[BaseModel] = Settings
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return any(word in str(part).lower() for word in SECRET_WORDS)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        return annotation is SecretStr or SecretStr in get_args(annotation)
    return False


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad field: its dotted name, the reason and the value given (``***`` for a secret)."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        if isinstance(value, dict):
            shown = ""
        else:
            shown = " (got ***)" if is_secret_field(tuple(err["loc"])) else f" (got {_shown(value)})"
        lines.append(f"config error: {field}: {err['msg']}{shown}")
    return "\n".join(lines)


def _shown(value: object, limit: int = 80) -> str:
    """``value``'s repr, cut to ``limit`` characters: a config file's value may be megabytes long.

    >>> _shown("x" * 100)
    "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (102 characters)"
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


NOT_SETTINGS = {"DYNFT_CONFIG"}  # read by the command line (--config), not a setting


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``DYNFT_*`` variable that names no setting: pydantic-settings ignores
    those silently, so ``DYNFT_SEVER__PORT`` would leave the port at its default unnoticed (a
    mistyped field of a section, ``DYNFT_SERVER__PROT``, is an error already: sections forbid extras).

    >>> unknown_environment({"DYNFT_SEVER__PORT": "9000", "DYNFT_SERVER__PORT": "1", "HOME": "/"})
    ['DYNFT_SEVER__PORT names no setting and is ignored (did you mean DYNFT_SERVER__...?)']
    """
    fields = [name.upper() for name in Settings.model_fields]
    out = []
    for key in sorted(environ):
        upper = key.upper()
        if not upper.startswith("DYNFT_") or upper in NOT_SETTINGS:
            continue
        head, nested, _ = upper.removeprefix("DYNFT_").partition("__")
        if head in fields:
            continue
        close = difflib.get_close_matches(head, fields, n=1)
        hint = f" (did you mean DYNFT_{close[0]}{'__...' if nested else ''}?)" if close else ""
        out.append(f"{key} names no setting and is ignored{hint}")
    return out


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the effective settings: defaults < config file < environment < overrides.

    ``overrides`` uses dotted keys (``{"server.port": 9000}``), as CLI flags do.
    Raises ``ConfigError`` with one line per invalid field.
    """
    file_data = read_config_file(config_file) if config_file is not None else {}
    cli_data = nest(overrides or {})

    class _Layered(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (
                InitSettingsSource(settings_cls, cli_data),
                env_settings,
                InitSettingsSource(settings_cls, file_data),
            )

    try:
        return _Layered()
    except ValidationError as exc:
        # ``from None``: pydantic's own message repeats every input value, secrets included, and a
        # chained traceback would print it wherever this error is ever logged.
        raise InvalidSettingsError(format_validation_error(exc)) from None
    except SettingsError as exc:  # an environment variable pydantic-settings could not even parse
        raise InvalidSettingsError(unparsable_environment(exc)) from None


def unparsable_environment(exc: SettingsError) -> str:
    """The ``config error`` line for an environment value that is not JSON where JSON is needed
    (a list or a mapping, as ``DYNFT_DRIFT__REACTIONS='["boost"]'``): the variables that name it,
    never their values (they may be secrets)."""
    field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else ""
    prefix = f"DYNFT_{field.upper()}"
    names = sorted(k for k in os.environ if k.upper() == prefix or k.upper().startswith(prefix + "__"))
    bad_json = exc.__cause__ if isinstance(exc.__cause__, json.JSONDecodeError) else None
    cause = f": {bad_json.msg} at character {bad_json.pos}" if bad_json else ""  # other causes may quote the value
    where = ", ".join(names) if names and field else "a DYNFT_ environment variable"
    return (
        f"config error: {where}: not a valid value for {field or 'a setting'}{cause} "
        "(lists and mappings are JSON, e.g. DYNFT_DRIFT__REACTIONS='[\"boost\"]')"
    )


def reference_table() -> str:
    """Every setting as a Markdown table (setting, environment variable, default, meaning)."""
    rows = ["| setting | environment variable | default | meaning |", "|---|---|---|---|"]
    defaults = Settings.model_construct()
    for name, field in Settings.model_fields.items():
        value = getattr(defaults, name, field.default)
        if isinstance(value, BaseModel):
            for sub, subfield in type(value).model_fields.items():
                env = f"DYNFT_{name.upper()}__{sub.upper()}"
                rows.append(_row(f"{name}.{sub}", env, getattr(value, sub), subfield))
        else:
            rows.append(_row(name, f"DYNFT_{name.upper()}", value, field))
    return "\n".join(rows)


def _row(key: str, env: str, default: Any, field: Any) -> str:
    shown = "generated" if key == "server.admin_token" else json.dumps(default, default=str)
    return f"| `{key}` | `{env}` | `{shown}` | {field.description or ''} |"
