"""The ``dynft`` command line. The one place where errors become messages and exit codes.

Exit codes: 0 done, 1 runtime failure, 2 invalid configuration or arguments; which error gets
which is decided by its type, in one place (``dynft.errors.exit_code``).
Heavy modules (torch, transformers) are imported inside the commands that need them, so
``dynft config`` and ``dynft adapters`` answer quickly.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from dynft.errors import EXIT_CONFIG, ConfigError, DynftError, InvalidSettingsError, SourceError, exit_code
from dynft.settings import Settings, load_settings, parse_assignment, reference_table
from dynft.statedir import (
    StateLock,
    admin_token,
    check_state_dir,
    private_files,
    refuse_symlinks,
    wait_for_state_dir,
)

F = TypeVar("F", bound=Callable[..., Any])


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
        click.option("--state-dir", type=click.Path(path_type=Path), help="Registry, dead letters and run files."),
        click.option("--source", help="demo | file:PATH | file:- (stdin)."),
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
    return load_settings(kwargs.pop("config_file", None), overrides)


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
    for noisy in ("httpx", "urllib3", "filelock", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet_libraries() -> None:
    """Silence load reports and progress bars of transformers; dynft logs what matters itself."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


@click.group()
@click.version_option(package_name="dynft")
def main() -> None:
    """dynft: a text classifier that keeps learning from a stream of labeled events."""


@main.command()
@settings_options
@click.option("--reference", is_flag=True, help="Print every setting as a Markdown table instead.")
@reports_errors
def config(reference: bool, **kwargs: Any) -> None:
    """Print the effective configuration (secrets masked)."""
    if reference:
        click.echo(reference_table())
        return
    click.echo(json.dumps(settings_from(kwargs).public_dump(), indent=2))


@main.command()
@settings_options
@reports_errors
def run(**kwargs: Any) -> None:
    """Run the trainer and the inference server, and keep both running."""
    settings = settings_from(kwargs)
    setup_logging(settings.log_level, "dynft")
    private_files()
    preflight(settings)
    lock = StateLock.acquire(settings.state_dir)  # held for the whole run; the trainer child checks it
    admin_token(settings)  # a generated token exists (0600) and an existing one is trusted, before any child
    from dynft.supervisor import Supervisor

    try:
        code = Supervisor(settings).run()
    finally:
        lock.release()
    sys.exit(code)


def preflight(settings: Settings) -> None:
    """Checks that would otherwise fail in every child process, each restart again."""
    from dynft.modeldir import resolve_model_path
    from dynft.sources import open_source
    from dynft.supervisor import check_apart

    resolve_model_path(settings.model.path)
    open_source(settings.source, settings.kafka)
    check_apart(check_detectors, settings)  # river stays out of the supervisor's memory
    wait_for_state_dir(settings.state_dir, settings.run.restart_backoff_s, settings.run.restart_backoff_max_s)
    refuse_symlinks(settings)


def check_detectors(settings: Settings) -> None:
    from dynft.drift import make_detector

    make_detector(settings.drift.error_detector, settings.drift.error_params)
    make_detector(settings.drift.loss_detector, settings.drift.loss_params)
    make_detector(settings.drift.label_detector, settings.drift.label_params)
    make_detector(settings.drift.representation_detector, settings.drift.representation_params)


@main.command()
@settings_options
@click.option("--colocated", is_flag=True, hidden=True, help="Leave CPU threads to a server on this host.")
@click.option("--metrics-port", type=int, help="Expose this trainer's metrics on 127.0.0.1:PORT/metrics.")
@click.option("--supervisor-pid", type=int, hidden=True, help="Under `dynft run`: the pid that holds the state lock.")
@reports_errors
def train(colocated: bool, metrics_port: int | None, supervisor_pid: int | None, **kwargs: Any) -> None:
    """Run the trainer alone: stream -> buffer -> trainer -> registry."""
    settings = settings_from(kwargs)
    setup_logging(settings.log_level, "trainer")
    private_files()
    check_state_dir(settings.state_dir)
    refuse_symlinks(settings)
    if supervisor_pid is None:
        StateLock.acquire(settings.state_dir)  # never released: the lock goes when this process does
    else:
        StateLock.held_by(settings.state_dir, supervisor_pid)
    quiet_libraries()
    from prometheus_client import CollectorRegistry, start_http_server

    from dynft.lives import run_lives

    registry = CollectorRegistry()
    if metrics_port is not None:  # under `dynft run` the server's /metrics covers the trainer instead
        start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
    run_lives(settings, registry, colocated)


@main.command()
@settings_options
@click.option(
    "--follow",
    metavar="kafka://HOST:PORT/TOPIC",
    help="A replica: serve what the versions topic says (kafka.versions_topic of the trainer), no shared disk.",
)
@click.option(
    "--replica-dir",
    type=click.Path(path_type=Path),
    hidden=True,
    help="With --follow: the replica's registry (default <state_dir>/registry; `dynft run` of an elected trainer).",
)
@reports_errors
def serve(follow: str | None, replica_dir: Path | None, **kwargs: Any) -> None:
    """Run the inference server alone, following the registry's serving version (or a versions topic)."""
    settings = settings_from(kwargs)
    setup_logging(settings.log_level, "replica" if follow else "server")
    # No state lock: a server only reads what the trainer writes (its admin writes go through the
    # registry's own lock), and one trainer with any number of servers on a shared state volume
    # is the way to scale serving. Its files are private all the same.
    private_files()
    quiet_libraries()
    from dynft.serving.server import Server

    if follow is not None:
        check_state_dir(settings.state_dir)
    Server(settings, follow=follow, registry_dir=replica_dir if follow else None).run()


@main.group()
def adapters() -> None:
    """List, inspect, promote and roll back adapter versions (works on the registry directly)."""


task_option = click.option("--task", default="default", show_default=True, help="The task whose versions these are.")


def _registry(kwargs: dict[str, Any]) -> Any:
    from dynft.errors import RegistryError
    from dynft.registry import AdapterRegistry
    from dynft.tasks import DEFAULT_TASK, known_tasks, task_registry_dir

    task = kwargs.pop("task", DEFAULT_TASK)
    s = settings_from(kwargs)
    if task not in known_tasks(s.registry_dir):  # never create a registry for a mistyped task
        raise RegistryError(
            f"task {task[:64]!r} has no versions in {s.registry_dir}; known tasks: "
            + ", ".join(known_tasks(s.registry_dir))
        )
    root = task_registry_dir(s.registry_dir, task)
    return AdapterRegistry(root, s.registry.keep_last, s.registry.keep_serving_history)


@adapters.command("list")
@settings_options
@task_option
@reports_errors
def adapters_list(**kwargs: Any) -> None:
    """One line per version: number, gate decision, accuracy, labels, serving marker."""
    registry = _registry(kwargs)
    pointer = registry.serving()
    for version in registry.versions():
        meta = registry.meta(version)
        gate = meta.get("gate", {})
        acc = meta.get("metrics", {}).get("prequential_accuracy")
        mark = "*" if version == pointer.version else " "
        pin = " (pinned)" if mark == "*" and pointer.pinned else ""
        click.echo(
            f"{mark} v{version:<5} {gate.get('decision', '-'):<9} step {meta.get('step', 0):<7} "
            f"acc {acc if acc is None else round(acc, 3)!s:<6} labels {meta.get('labels', '-'):<4} "
            f"lineage {meta.get('lineage', '-')} {meta.get('created_at', '')}{pin}"
        )


@adapters.command("show")
@click.argument("version", type=int)
@settings_options
@task_option
@reports_errors
def adapters_show(version: int, **kwargs: Any) -> None:
    """The metadata of one version, as JSON."""
    click.echo(json.dumps(_registry(kwargs).meta(version), indent=2))


@adapters.command("promote")
@click.argument("version", type=int)
@settings_options
@task_option
@reports_errors
def adapters_promote(version: int, **kwargs: Any) -> None:
    """Serve VERSION now, pinned (the gate will not replace it until `dynft adapters unpin`)."""
    from dynft.fingerprint import BaseModelId
    from dynft.model import resolve_model_path, resolve_pooling

    settings = settings_from({k: v for k, v in kwargs.items() if k != "task"})
    path = resolve_model_path(settings.model.path)  # a version of another base model is refused
    base_model = BaseModelId.of(path, resolve_pooling(path, settings.model.pooling))
    _registry(kwargs).promote(version, reason="promoted from the command line", pin=True, base_model=base_model)
    click.echo(f"serving v{version} (pinned)")


@adapters.command("rollback")
@settings_options
@task_option
@reports_errors
def adapters_rollback(**kwargs: Any) -> None:
    """Serve the previous serving version again, pinned."""
    version = _registry(kwargs).rollback("rolled back from the command line")
    click.echo(f"serving v{version} (pinned)")


@adapters.command("unpin")
@settings_options
@task_option
@reports_errors
def adapters_unpin(**kwargs: Any) -> None:
    """Let the promotion gate replace the serving version again."""
    _registry(kwargs).unpin()
    click.echo("unpinned")


@main.group()
def kafka() -> None:
    """A local single-node Kafka broker for development (jars from Maven Central)."""


@kafka.command("up")
@click.option("--port", type=int, default=0, help="Broker port (default: a free one).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("dynft-kafka"), show_default=True)
@click.option("--libs", type=click.Path(path_type=Path), help="Directory of broker jars (default: fetched with Maven).")
@reports_errors
def kafka_up(port: int, data_dir: Path, libs: Path | None) -> None:
    """Start the broker, wait until it answers, print its bootstrap address."""
    from dynft import devbroker

    click.echo(devbroker.start(data_dir, port, libs).bootstrap)


@kafka.command("down")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("dynft-kafka"), show_default=True)
@reports_errors
def kafka_down(data_dir: Path) -> None:
    """Stop the broker started from DATA_DIR."""
    from dynft import devbroker

    click.echo("stopped" if devbroker.stop(data_dir) else f"no broker running from {data_dir}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--topic", required=True, help="Topic to publish to (created if missing).")
@click.option("--bootstrap", default="127.0.0.1:9092", show_default=True, help="HOST:PORT[,HOST:PORT].")
@click.option("--rate", type=float, default=0.0, help="Records per second (default: as fast as possible).")
@click.option("--partitions", type=int, default=1, show_default=True, help="Partitions of a topic created here.")
@click.option(
    "--key",
    "key_field",
    type=click.Choice(["label", "task", "id"]),
    help="Key records by this event field, so it lands on a stable partition.",
)
@settings_options
@reports_errors
def produce(
    path: Path, topic: str, bootstrap: str, rate: float, partitions: int, key_field: str | None, **kwargs: Any
) -> None:
    """Publish a JSON Lines dataset (PATH, or - for stdin) to a Kafka topic, one line per record."""
    from dynft.produce import ensure_topic
    from dynft.produce import produce as send
    from dynft.sources.kafka_connect import client_config, security_warnings

    settings = settings_from(kwargs)
    servers = [s for s in bootstrap.split(",") if s]
    client = client_config(settings.kafka)
    for warning in security_warnings(settings.kafka):
        click.echo(f"warning: {warning}", err=True)
    have = ensure_topic(servers, topic, partitions, client)
    if have != partitions:
        click.echo(f"note: topic {topic} has {have} partition(s)", err=True)
    total = None if str(path) == "-" else count_lines(path)
    with click.progressbar(length=total or 0, label=f"producing to {topic}", file=sys.stderr) as bar:
        sent = send(path, servers, topic, client, rate, key_field, bar.update)
    click.echo(f"produced {sent} records to {topic}")


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror})") from exc


@main.command()
@click.argument("ids", nargs=-1)
@click.option("--from-file", type=click.Path(path_type=Path), help="Look up the ids of this JSON Lines file.")
@settings_options
@reports_errors
def ledger(ids: tuple[str, ...], from_file: Path | None, **kwargs: Any) -> None:
    """What became of events: one JSON line per id, or the counts per status without ids."""
    from dynft.ledger import Ledger

    settings = settings_from(kwargs)
    path = settings.state_dir / "ledger.db"
    if not path.exists():
        raise ConfigError(f"no ledger at {path} (has the trainer run with this --state-dir?)")
    book = Ledger(path)
    wanted = list(ids)
    if from_file is not None:
        wanted += ids_of(from_file)
    if not wanted:
        click.echo(json.dumps(book.counts()))
        return
    for event_id, (status, seen) in book.lookup(wanted).items():
        click.echo(json.dumps({"id": event_id, "status": status, "seen": seen}))


def ids_of(path: Path) -> list[str]:
    """The ``id`` of every line of a JSON Lines file; a line without one is a clear error."""
    out = []
    try:
        with open(path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    out.append(str(json.loads(line)["id"]))
                except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: nested too deeply
                    raise ConfigError(f"{path}:{n}: not a JSON object with an id ({exc!r})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    return out
