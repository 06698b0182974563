"""The ``dynft`` command line: the daemon's commands (``run``, ``train``, ``serve``, ``config``);
the operations commands are in ``dynft.cliops``, the shared flags and error reporting in ``dynft.clikit``.

Exit codes: 0 done, 1 runtime failure, 2 invalid configuration or arguments; which error gets
which is decided by its type, in one place (``dynft.errors.exit_code``), and every command
reports it the same way (``dynft.clikit.reports_errors``).
Heavy modules (torch, transformers) are imported inside the commands that need them, so
``dynft config`` and ``dynft adapters`` answer quickly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from dynft.clikit import quiet_libraries, reports_errors, settings_from, settings_options, setup_logging
from dynft.cliops import adapters, kafka, ledger, produce
from dynft.errors import ConfigError
from dynft.settings import Settings, reference_table
from dynft.statedir import (
    StateLock,
    admin_token,
    check_state_dir,
    private_files,
    refuse_symlinks,
    wait_for_state_dir,
)


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
    make_detector(settings.drift.input_detector, settings.drift.input_params)
    make_detector(settings.drift.representation_detector, settings.drift.representation_params)


@main.command()
@settings_options
@click.option("--colocated", is_flag=True, hidden=True, help="Leave CPU threads to a server on this host.")
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535), help="Expose this trainer's metrics on 127.0.0.1:PORT/metrics."
)
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
        try:
            start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
        except OSError as exc:  # in use, say: the command line's to change, as a server port in use is
            raise ConfigError(f"--metrics-port: cannot listen on 127.0.0.1:{metrics_port} ({exc.strerror})") from exc
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
    from dynft.serving.server import Server, on_stop_signals

    if follow is not None:
        check_state_dir(settings.state_dir)
    # A stop by SIGINT/SIGTERM exits 0, as `dynft run` does: at startup at once, and once uvicorn
    # runs, after its graceful shutdown (it raises the signal again for the handler it found:
    # this one). Not in `dynft run`'s server process: a signal from anyone but its supervisor is
    # a crash there, to restart.
    with on_stop_signals(_exit_zero):
        Server(settings, follow=follow, registry_dir=replica_dir if follow else None).run()


def _exit_zero(signum: int, frame: object) -> None:
    raise SystemExit(0)


for _command in (adapters, kafka, produce, ledger):  # dynft.cliops
    main.add_command(_command)
