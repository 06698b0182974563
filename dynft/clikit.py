"""The command line's shared parts: the settings flags, logging, and the one place where errors
become messages and exit codes (``reports_errors``; which error gets which code is decided by its
type in ``dynft.errors.exit_code``). Used by ``dynft.cli`` and ``dynft.cliops``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sqlite3
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from dynft.errors import EXIT_CONFIG, DynftError, InvalidSettingsError, exit_code
from dynft.settings import Settings, load_settings, parse_assignment, unknown_environment

F = TypeVar("F", bound=Callable[..., Any])

task_option = click.option("--task", default="default", show_default=True, help="The task whose versions these are.")


def settings_options(func: F) -> F:
    """Flags shared by every command that reads the configuration."""
    options = [
        click.option(
            "--config",
            "config_file",
            type=click.Path(path_type=Path),
            envvar="DYNFT_CONFIG",
            help="TOML, YAML or JSON config file (also $DYNFT_CONFIG).",
        ),
        click.option("--state-dir", type=click.Path(), help="Registry, dead letters and run files."),
        click.option("--source", help="demo | file:PATH | file:- (stdin) | kafka://HOST:PORT/TOPIC[,TOPIC]?group=G."),
        click.option("--model", help="Hugging Face model directory (default: packaged all-MiniLM-L6-v2)."),
        click.option("--device", help="Where the model runs: auto, cpu, cuda or cuda:N."),
        click.option("--host", help="Server address."),
        click.option("--port", type=int, help="Server port."),
        click.option(
            "--set",
            "assignments",
            multiple=True,
            metavar="SECTION.FIELD=VALUE",
            help="Any setting, e.g. --set trainer.lr=5e-4 (repeatable).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def settings_from(kwargs: dict[str, Any]) -> Settings:
    overrides: dict[str, Any] = dict(parse_assignment(a) for a in kwargs.pop("assignments", ()) or ())
    flags = {
        "state_dir": "state_dir",
        "source": "source.uri",
        "model": "model.path",
        "device": "model.device",
        "host": "server.host",
        "port": "server.port",
    }
    for flag, key in flags.items():
        value = kwargs.pop(flag, None)
        if value is not None:
            overrides[key] = str(value) if isinstance(value, Path) else value
    settings = load_settings(kwargs.pop("config_file", None), overrides)
    for warning in unknown_environment(os.environ):  # once: `dynft run`'s children get no DYNFT_* variables
        click.echo(f"warning: {warning}", err=True)
    return settings


def finite(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    """A click callback: a float option must be a number (``FloatRange`` lets NaN through)."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def reports_errors(func: F) -> F:
    """Turn an error that ends a command into one line on stderr and its exit code (``errors.exit_code``)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InvalidSettingsError as exc:  # already one "config error: ..." line per field
            click.echo(str(exc), err=True)
            sys.exit(exit_code(exc))
        except DynftError as exc:
            prefix = "dynft: " if exit_code(exc) == EXIT_CONFIG else "dynft: error: "
            click.echo(f"{prefix}{exc}", err=True)
            sys.exit(exit_code(exc))
        except BrokenPipeError:  # the reader went away (`dynft adapters list | head`): nothing to report
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush fails no more
            sys.exit(1)
        except (OSError, sqlite3.Error) as exc:  # a disk problem that no check above foresaw: still one line
            where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
            click.echo(f"dynft: error: {where}{getattr(exc, 'strerror', None) or exc}", err=True)
            sys.exit(exit_code(exc))

    return wrapper  # type: ignore[return-value]


def setup_logging(level: str, role: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)-5s [{role}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from dynft.sources.kafka_connect import quiet_kafka_logs

    quiet_kafka_logs(logging.getLevelName(level))


def quiet_libraries() -> None:
    """Silence load reports and progress bars of transformers; dynft logs what matters itself."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
