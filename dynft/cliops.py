"""Operations on what a daemon leaves behind, and development helpers: ``dynft adapters``
(versions, per task), ``dynft ledger`` (what became of events), ``dynft kafka up|down`` (a local
broker) and ``dynft produce`` (a dataset into a topic). Registered on ``dynft.cli.main``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dynft.clikit import finite, reports_errors, settings_from, settings_options, task_option
from dynft.errors import ConfigError, RegistryError, SourceError

if TYPE_CHECKING:
    from dynft.settings import EventSettings


@click.group()
def adapters() -> None:
    """List, inspect, promote and roll back adapter versions (works on the registry directly)."""


def _registry(kwargs: dict[str, Any]) -> Any:
    from dynft.registry import AdapterRegistry
    from dynft.statedir import private_files
    from dynft.tasks import DEFAULT_TASK, known_tasks, task_registry_dir

    task = kwargs.pop("task", DEFAULT_TASK)
    s = settings_from(kwargs)
    if not s.registry_dir.is_dir():  # never create one for a mistyped --state-dir either
        raise ConfigError(f"no registry at {s.registry_dir} (has the trainer run with this --state-dir?)")
    if task not in known_tasks(s.registry_dir):  # never create a registry for a mistyped task: a usage error
        raise ConfigError(
            f"task {task[:64]!r} has no versions in {s.registry_dir}; known tasks: "
            + ", ".join(known_tasks(s.registry_dir))
        )
    root = task_registry_dir(s.registry_dir, task)
    private_files()  # what an operator's command writes (serving.json, a lock) stays 0600, as the daemon's
    return AdapterRegistry(root, s.registry.keep_last, s.registry.keep_serving_history)


@adapters.command("list")
@settings_options
@task_option
@reports_errors
def adapters_list(**kwargs: Any) -> None:
    """One line per version: number, gate decision, accuracy, labels, serving marker."""
    registry = _registry(kwargs)
    pointer = registry.serving()
    versions = registry.versions()
    if not versions:  # said, where a silent exit 0 looked like a listing
        click.echo(f"no versions in {registry.root} (none published yet, or versions/ was removed)", err=True)
    for version in versions:
        mark = "*" if version == pointer.version else " "
        pin = " (pinned)" if mark == "*" and pointer.pinned else ""
        try:
            meta = registry.meta(version)
        except RegistryError as exc:  # one damaged version hides none of the others
            click.echo(f"{mark} v{version:<5} unreadable: {exc}{pin}")
            continue
        gate, metrics = (meta.get(k) if isinstance(meta.get(k), dict) else {} for k in ("gate", "metrics"))
        acc = metrics.get("prequential_accuracy")
        acc = round(acc, 3) if isinstance(acc, float) else acc
        click.echo(  # !s each: a meta.json edited by hand may hold any JSON there
            f"{mark} v{version:<5} {gate.get('decision', '-')!s:<9} step {meta.get('step', 0)!s:<7} "
            f"acc {acc!s:<6} labels {meta.get('labels', '-')!s:<4} "
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


@click.group()
def kafka() -> None:
    """A local single-node Kafka broker for development (jars from Maven Central)."""


@kafka.command("up")
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="Broker port (default: a free one).")
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


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--topic", required=True, help="Topic to publish to (created if missing).")
@click.option("--bootstrap", default="127.0.0.1:9092", show_default=True, help="HOST:PORT[,HOST:PORT].")
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=0.0,
    callback=finite,
    help="Records per second (default: as fast as possible).",
)
@click.option(
    "--partitions", type=click.IntRange(min=1), default=1, show_default=True, help="Partitions of a topic created here."
)
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
    from dynft.sources.kafka_connect import client_config, security_warnings, servers_problem

    settings = settings_from(kwargs)
    servers = [s for s in bootstrap.split(",") if s]
    problem = servers_problem(servers)
    if problem is not None:
        raise click.BadParameter(problem, param_hint="--bootstrap")
    client = client_config(settings.kafka)
    for warning in security_warnings(settings.kafka):
        click.echo(f"warning: {warning}", err=True)
    total = None if str(path) == "-" else count_lines(path)  # a missing file is named before any broker is asked
    have = ensure_topic(servers, topic, partitions, client)
    if have != partitions:
        click.echo(f"note: topic {topic} has {have} partition(s)", err=True)
    with click.progressbar(length=total or 0, label=f"producing to {topic}", file=sys.stderr) as bar:
        sent = send(path, servers, topic, client, rate, key_field, bar.update)
    click.echo(f"produced {sent} records to {topic}")


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror})") from exc


@click.command()
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
    book = Ledger(path, create=False)  # a reader: checked, never given a schema
    wanted = list(ids)
    if from_file is not None:
        wanted += ids_of(from_file, settings.events)
        if not wanted:
            raise ConfigError(f"{from_file}: no line has a usable id")
    if not wanted:
        click.echo(json.dumps(book.counts()))
        return
    for event_id, (status, seen) in book.lookup(wanted).items():
        click.echo(json.dumps({"id": event_id, "status": status, "seen": seen}))


def ids_of(path: Path, limits: EventSettings) -> list[str]:
    """The id the daemon keys the ledger by for each line of a JSON Lines file: decoded as the
    daemon decodes it, so a record it rejected is looked up too where its id was usable. A line
    without a usable id cannot be in the ledger: it is named on stderr and skipped, not fatal,
    since such lines are what a user asks about after a run that dead-lettered some."""
    from dynft.events import Event, decode
    from dynft.sources.file import BOM

    out = []
    try:
        with open(path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                raw = line.removeprefix(BOM) if n == 1 else line  # as the file source skips it
                if not raw.strip():
                    continue
                decoded = decode(raw.rstrip(b"\r\n"), limits)
                if isinstance(decoded, Event):
                    out.append(decoded.id)
                elif decoded.event_id is not None:
                    out.append(decoded.event_id)
                else:
                    click.echo(f"{path}:{n}: no usable id ({decoded.reason}: {decoded.detail}); skipped", err=True)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    return out
