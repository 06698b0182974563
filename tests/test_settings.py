from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynft.errors import ConfigError
from dynft.settings import load_settings


def test_defaults_are_the_embedded_demo() -> None:
    s = load_settings()
    assert s.source.uri == "demo"
    assert s.model.path is None
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8000)


def test_precedence_file_then_env_then_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "dynft.toml"
    config.write_text("[trainer]\nlr = 0.1\nbatch_size = 4\n[server]\nport = 9001\nmax_batch = 8\nmax_texts = 8\n")
    monkeypatch.setenv("DYNFT_TRAINER__LR", "0.2")
    monkeypatch.setenv("DYNFT_STATE_DIR", str(tmp_path / "from-env"))
    s = load_settings(config, {"server.port": 9002})
    assert s.trainer.lr == 0.2  # env beats file
    assert s.trainer.batch_size == 4  # file beats default
    assert s.server.port == 9002  # CLI beats file
    assert s.server.max_batch == 8
    assert s.state_dir == tmp_path / "from-env"


@pytest.mark.parametrize(
    "suffix,text", [(".yaml", "buffer:\n  max_events: 7\n"), (".json", '{"buffer": {"max_events": 7}}')]
)
def test_yaml_and_json_config_files(tmp_path: Path, suffix: str, text: str) -> None:
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    assert load_settings(path).buffer.max_events == 7


def test_invalid_values_name_the_field_and_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNFT_BUFFER__REPLAY_RATIO", "1.5")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert str(err.value) == "config error: buffer.replay_ratio: Input should be less than 1 (got '1.5')"


def test_a_batch_no_step_could_hold_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of 10^8 rows was accepted, and the first step took the whole replay buffer into one
    forward pass."""
    monkeypatch.setenv("DYNFT_TRAINER__BATCH_SIZE", "100000000")
    with pytest.raises(ConfigError, match=r"trainer\.batch_size: Input should be less than or equal to 4096"):
        load_settings()


def test_a_distillation_temperature_whose_loss_cannot_be_finite_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe's 1e-300 passed, and every step with a teacher was skipped as non-finite."""
    monkeypatch.setenv("DYNFT_TRAINER__DISTILL_TEMPERATURE", "1e-300")
    with pytest.raises(ConfigError, match=r"distill_temperature: Input should be greater than or equal to 0\.05"):
        load_settings()
    monkeypatch.setenv("DYNFT_TRAINER__DISTILL_TEMPERATURE", "0.05")
    assert load_settings().trainer.distill_temperature == 0.05


@pytest.mark.parametrize(
    ("name", "value"),
    [("DYNFT_DRIFT__REACTIONS", "[boost]"), ("DYNFT_DRIFT__INPUT_PARAMS", "{delta: 2}"), ("DYNFT_KAFKA", "secret!")],
)
def test_an_environment_value_that_is_not_json_where_json_is_needed_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """Lists and mappings come from the environment as JSON; a value that does not parse names its
    variable (never the value, which may be a secret) instead of ending in a traceback."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert message.startswith(f"config error: {name}: not a valid value for ") and "JSON" in message, message
    assert value not in message


def test_unknown_keys_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[trainer]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match=r"trainer\.learning_rate: Extra inputs are not permitted"):
        load_settings(path)


def test_bad_config_files_are_reported_with_their_name(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[trainer\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_settings(broken)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path / "missing.toml")
    ini = tmp_path / "c.ini"
    ini.write_text("[trainer]\n")
    with pytest.raises(ConfigError, match="unknown format"):
        load_settings(ini)


def test_secrets_are_masked_in_the_public_dump() -> None:
    s = load_settings(overrides={"server.admin_token": "hunter2"})
    assert s.public_dump()["server"]["admin_token"] == "**********"
    assert s.secret_dump()["server"]["admin_token"] == "hunter2"
    assert "hunter2" not in json.dumps(s.public_dump())


def test_max_texts_cannot_exceed_a_batch() -> None:
    with pytest.raises(ConfigError, match=r"server\.max_texts: Value error, must be at most server\.max_batch"):
        load_settings(overrides={"server.max_batch": 4, "server.max_texts": 8})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"server.max_queue": 1}, r"server\.max_queue = 1 is below server\.max_texts = 32"),
        ({"server.host": ""}, r"server\.host: Value error, is blank"),
    ],
    ids=["queue-below-a-request", "blank-host"],
)
def test_server_settings_that_could_never_work_are_refused(overrides: dict[str, object], message: str) -> None:
    """Found by a review: a queue shorter than a request answered 503 for ever; a blank host (an
    unset shell variable) listened on every interface. (An empty admin token is allowed: it locks
    the admin API, as the shipped Kubernetes Secret does.)"""
    with pytest.raises(ConfigError, match=message):
        load_settings(overrides=overrides)


def test_a_huge_bad_value_is_shown_cut(tmp_path: Path) -> None:
    """A review's 10 MB value in a config file came back as a 10 MB "one-line" error."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"server": {"host": ["x" * 1_000_000]}}))
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert len(str(err.value)) < 300 and "characters)" in str(err.value)


def test_the_shipped_example_config_is_valid() -> None:
    s = load_settings(Path(__file__).parent.parent / "deploy" / "dynft.example.toml")
    assert s.source.follow and s.server.host == "0.0.0.0"


def test_the_readme_documents_every_setting() -> None:
    from dynft.settings import reference_table

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert reference_table() in readme, "regenerate the README table with `dynft config --reference`"


def test_config_files_that_are_not_utf8_or_too_deep_are_configuration_errors(tmp_path: Path) -> None:
    """Both raised Python's own errors (a traceback and exit 1) before."""
    from dynft.settings.files import parse_assignment, read_config_file

    binary = tmp_path / "c.toml"
    binary.write_bytes(b"\xff\xfe[trainer]\n")
    with pytest.raises(ConfigError, match=r"c.toml: not UTF-8 text \(invalid byte at offset 0\)"):
        read_config_file(binary)
    deep = tmp_path / "c.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match=r"c\.json: nested too deeply to parse"):
        read_config_file(deep)
    with pytest.raises(ConfigError, match=r"--set trainer\.lr: the value is nested too deeply"):
        parse_assignment("trainer.lr=" + "[" * 100_000 + "]" * 100_000)
    assert parse_assignment("trainer.lr=[[1]]") == ("trainer.lr", [[1]])


def test_an_empty_state_directory_is_refused_not_taken_for_the_working_directory() -> None:
    from click.testing import CliRunner

    from dynft.cli import main

    with pytest.raises(ConfigError, match="state_dir: Value error, empty; name a directory"):
        load_settings(overrides={"state_dir": " "})
    result = CliRunner().invoke(main, ["config", "--state-dir", ""])
    assert result.exit_code == 2 and "state_dir" in result.output
    assert load_settings(overrides={"state_dir": "."}).state_dir == Path(".")


def test_a_yaml_config_whose_aliases_expand_past_any_real_configuration_is_refused(tmp_path: Path) -> None:
    """Found by a probe: nine lines of nested aliases ("billion laughs") under drift.error_params
    made `dynft config` (and `dynft run`) run for minutes into 4.7 GB; it is one line now."""
    lines = ["drift:", "  error_params:", '    a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="more than 100,000 values once its aliases are expanded"):
        load_settings(path)
    path.write_text("drift:\n  error_params: &p {delta: 0.01}\n  loss_params: *p\n")  # a small alias is fine
    assert load_settings(path).drift.error_params == {"delta": 0.01}


@pytest.mark.parametrize("name", ["a/b", "bad topic!", ".", "..", "x" * 242])
def test_a_versions_topic_kafka_would_refuse_is_a_config_error_before_anything_starts(name: str) -> None:
    """Found by a probe: the broker refused such a name only once the trainer ran (exit 1), and
    ``dynft run`` restarted it for ever; 242 characters are a valid name whose pointer topic is not."""
    from dynft.replication.follower import parse_follow_uri

    with pytest.raises(ConfigError, match=r"kafka\.versions_topic"):
        load_settings(overrides={"kafka.versions_topic": name})
    with pytest.raises(ConfigError, match="--follow"):
        parse_follow_uri(f"kafka://127.0.0.1:9092/{name}")
    assert load_settings(overrides={"kafka.versions_topic": "x" * 241}).kafka.versions_topic == "x" * 241
