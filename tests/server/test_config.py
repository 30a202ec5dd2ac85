"""Configuration: YAML < env < flags, KAFKA_USE_ACTOR_POOL both ways, errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from pool import PoolMode
from server._config import ConfigError, Settings, build_arg_parser, load_settings

ORIGINAL_YAML = """
eventbus:
  kafka:
    brokers:
      - kafka-1:9092
      - kafka-2:9092
    consumer:
      groupId: orders-projector
    actorPool:
      enabled: true
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_without_any_source() -> None:
    s = load_settings([], {})
    assert s.mode is PoolMode.KEYED
    assert s.kafka.brokers == ()
    assert s.embedded.enabled  # no brokers: embedded implied
    assert s.pool.keyed.workers == 256
    assert s.pool.keyed.queue_size == 1000
    assert s.pool.actor.actors == 256
    assert s.pool.actor.inbox_size == 1000
    assert s.pool.actor.max_restarts == 3
    assert s.pool.handler == "server.demo:handle"
    assert s.intake.max_value_bytes == 1024 * 1024
    assert s.intake.missing_id_policy == "route-by-offset"
    assert s.dead_letter.topic_for("orders") == "orders.dlq"
    assert s.grpc.address == "127.0.0.1:50051"
    assert s.metrics.address == "127.0.0.1:2112"
    assert s.kafka.consumer.commit_interval_ms == 1000


def test_original_keys_stay_valid(tmp_path: Path) -> None:
    s = load_settings(["--config", write(tmp_path, ORIGINAL_YAML)], {})
    assert s.kafka.brokers == ("kafka-1:9092", "kafka-2:9092")
    assert s.kafka.consumer.group_id == "orders-projector"
    assert s.mode is PoolMode.ACTOR
    assert not s.embedded.enabled  # brokers given: no embedded broker


def test_settings_are_frozen() -> None:
    s = load_settings([], {})
    with pytest.raises(pydantic.ValidationError):
        s.pool.handler = "x:y"


def test_precedence_yaml_then_env_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
eventbus:
  kafka:
    brokers: yaml:9092
    consumer: {groupId: from-yaml, commitIntervalMs: 111}
  pool:
    actor: {inboxSize: 10}
    keyed: {workers: 7}
""",
    )
    env = {
        "EVENTBUS__KAFKA__CONSUMER__GROUP_ID": "from-env",
        "EVENTBUS__POOL__ACTOR__INBOX_SIZE": "20",
        "EVENTBUS__KAFKA__BROKERS": "env-1:9092,env-2:9092",
    }
    s = load_settings(["--config", path], env)
    assert s.kafka.consumer.group_id == "from-env"  # env over yaml
    assert s.kafka.consumer.commit_interval_ms == 111  # yaml kept where env is silent
    assert s.pool.actor.inbox_size == 20
    assert s.kafka.brokers == ("env-1:9092", "env-2:9092")
    assert s.pool.keyed.workers == 7

    s = load_settings(
        [
            "--config",
            path,
            "--group-id",
            "from-flag",
            "--set",
            "pool.actor.inboxSize=30",
            "--brokers",
            "flag:9092",
        ],
        env,
    )
    assert s.kafka.consumer.group_id == "from-flag"  # flags over env
    assert s.pool.actor.inbox_size == 30
    assert s.kafka.brokers == ("flag:9092",)
    assert s.pool.keyed.workers == 7


def test_config_file_from_env_var(tmp_path: Path) -> None:
    s = load_settings([], {"POOL_CONFIG": write(tmp_path, ORIGINAL_YAML)})
    assert s.kafka.consumer.group_id == "orders-projector"


@pytest.mark.parametrize(
    ("value", "mode"),
    [("true", PoolMode.ACTOR), ("TRUE", PoolMode.ACTOR), ("1", PoolMode.ACTOR),
     ("false", PoolMode.KEYED), ("0", PoolMode.KEYED), ("off", PoolMode.KEYED)],
)  # fmt: skip
def test_kafka_use_actor_pool_env_sets_mode(value: str, mode: PoolMode) -> None:
    assert load_settings([], {"KAFKA_USE_ACTOR_POOL": value}).mode is mode


def test_kafka_use_actor_pool_false_really_turns_it_off(tmp_path: Path) -> None:
    # The YAML turns the actor pool on; the env var turns it off again.
    path = write(tmp_path, ORIGINAL_YAML)
    assert load_settings(["--config", path], {}).mode is PoolMode.ACTOR
    assert load_settings(["--config", path], {"KAFKA_USE_ACTOR_POOL": "false"}).mode is (
        PoolMode.KEYED
    )
    # ...and it wins over the general env form.
    env = {"EVENTBUS__KAFKA__ACTOR_POOL__ENABLED": "true", "KAFKA_USE_ACTOR_POOL": "false"}
    assert load_settings([], env).mode is PoolMode.KEYED


def test_mode_flag_overrides_env_both_ways() -> None:
    assert load_settings(["--mode", "keyed"], {"KAFKA_USE_ACTOR_POOL": "true"}).mode is (
        PoolMode.KEYED
    )
    assert load_settings(["--mode", "actor"], {"KAFKA_USE_ACTOR_POOL": "false"}).mode is (
        PoolMode.ACTOR
    )


def test_invalid_kafka_use_actor_pool_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^KAFKA_USE_ACTOR_POOL: must be true or false"):
        load_settings([], {"KAFKA_USE_ACTOR_POOL": "maybe"})


def test_flags_cover_documented_options() -> None:
    s = load_settings(
        [
            "--embedded",
            "--demo",
            "--brokers",
            "b1:1,b2:2",
            "--topic",
            "a",
            "--topic",
            "b",
            "--grpc-address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
            "--handler",
            "tests.x:handle",
            "--log-level",
            "DEBUG",
            "--set",
            "eventbus.demo.rate=5.5",
            "--set",
            "intake.missingIdPolicy=dead-letter",
        ],
        {},
    )
    assert s.embedded.enabled
    assert s.demo.enabled
    assert s.kafka.brokers == ("b1:1", "b2:2")
    assert s.kafka.topics == ("a", "b")
    assert s.grpc.address == "127.0.0.1:0"
    assert s.metrics.address == "127.0.0.1:0"
    assert s.pool.handler == "tests.x:handle"
    assert s.log.level == "debug"
    assert s.demo.rate == 5.5
    assert s.intake.missing_id_policy == "dead-letter"
    assert build_arg_parser().prog == "pool-server"


def test_every_option_has_help() -> None:
    parser = build_arg_parser()
    missing = ["/".join(a.option_strings) for a in parser._actions if not a.help]
    assert missing == []
    assert len(parser._actions) == 14  # the walk saw every option


def test_snake_case_yaml_keys_are_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "eventbus:\n  pool:\n    actor:\n      inbox_size: 5\n")
    assert load_settings(["--config", path], {}).pool.actor.inbox_size == 5


# -- error messages name the key ---------------------------------------------------


def error_of(argv: list[str], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(argv, env or {})
    return str(info.value)


def test_error_below_minimum() -> None:
    assert error_of(["--set", "pool.actor.inboxSize=0"]) == (
        "eventbus.pool.actor.inboxSize: must be >= 1 (got 0)"
    )


def test_error_above_maximum() -> None:
    msg = error_of([], {"EVENTBUS__DEMO__FAILURE_RATE": "1.5"})
    assert msg == "eventbus.demo.failureRate: must be <= 1.0 (got 1.5)"


def test_error_not_an_integer(tmp_path: Path) -> None:
    path = write(tmp_path, "eventbus:\n  pool:\n    keyed:\n      workers: many\n")
    assert error_of(["--config", path]) == (
        "eventbus.pool.keyed.workers: must be an integer (got 'many')"
    )


def test_error_unknown_key_in_yaml_env_and_set(tmp_path: Path) -> None:
    path = write(
        tmp_path, "eventbus:\n  kafka:\n    consumer:\n      groupID: x\n      grupId: y\n"
    )
    assert error_of(["--config", path]) == "eventbus.kafka.consumer.grupId: unknown key"
    assert "eventbus.pool.INBOX_SIZE: unknown key (from $EVENTBUS__POOL__INBOX_SIZE)" in error_of(
        [], {"EVENTBUS__POOL__INBOX_SIZE": "1"}
    )
    assert "eventbus.nope: unknown key (from --set nope.x)" in error_of(["--set", "nope.x=1"])


def test_error_bad_choice() -> None:
    msg = error_of(["--set", "intake.missingIdPolicy=drop"])
    assert msg.startswith("eventbus.intake.missingIdPolicy: must be one of ")
    assert "'route-by-offset'" in msg
    assert "'dead-letter'" in msg


def test_error_bad_boolean() -> None:
    assert error_of(["--set", "embedded.enabled=sometimes"]) == (
        "eventbus.embedded.enabled: must be true or false (got 'sometimes')"
    )


def test_error_cross_field_rule_names_section() -> None:
    msg = error_of(["--set", "kafka.consumer.revokeTimeoutMs=400000"])
    assert msg == "eventbus.kafka.consumer: revokeTimeoutMs must be below maxPollIntervalMs"


def test_error_bad_address_and_insecure_remote() -> None:
    assert error_of(["--grpc-address", "nope"]).startswith(
        "eventbus.grpc.address: must be host:port"
    )
    msg = error_of(["--grpc-address", "0.0.0.0:50051"])
    assert msg.startswith("eventbus.grpc: address 0.0.0.0:50051 is not loopback")
    s = load_settings(
        ["--grpc-address", "0.0.0.0:50051", "--set", "grpc.allowInsecureRemote=true"], {}
    )
    assert s.grpc.allow_insecure_remote


def test_remote_address_needs_tls_and_authentication() -> None:
    remote_tls = [
        "--grpc-address", "0.0.0.0:50051",
        "--set", "grpc.tls.certFile=/tmp/c.pem",
        "--set", "grpc.tls.keyFile=/tmp/k.pem",
    ]  # fmt: skip
    assert error_of(remote_tls).startswith(
        "eventbus.grpc: address 0.0.0.0:50051 is not loopback: set adminToken"
    )
    s = load_settings([*remote_tls, "--set", "grpc.adminToken=s3cret"], {})
    assert s.grpc.admin_token == "s3cret"


def test_error_tls_pair() -> None:
    assert error_of(["--set", "grpc.tls.certFile=/tmp/c.pem"]) == (
        "eventbus.grpc.tls: certFile and keyFile must be set together"
    )


def test_error_handler_path_and_dlq_template() -> None:
    assert error_of(["--handler", "no_colon"]).startswith(
        "eventbus.pool.handler: must be 'package.module:callable'"
    )
    assert error_of(["--set", "deadLetter.topicTemplate={name}.dlq"]).startswith(
        "eventbus.deadLetter.topicTemplate: invalid template"
    )


def test_error_bad_broker_and_topic() -> None:
    assert error_of(["--brokers", "kafka"]) == (
        "eventbus.kafka.brokers: must be host:port, got 'kafka'"
    )
    assert error_of(["--topic", "bad topic"]) == (
        "eventbus.kafka.topics: invalid topic name 'bad topic'"
    )


def test_error_several_at_once_one_line_each() -> None:
    err = error_of(["--set", "pool.keyed.workers=0", "--set", "pool.retry.jitter=2"])
    assert err.splitlines() == [
        "eventbus.pool.keyed.workers: must be >= 1 (got 0)",
        "eventbus.pool.retry.jitter: must be <= 1.0 (got 2)",
    ]


def test_error_file_problems(tmp_path: Path) -> None:
    assert "cannot read" in error_of(["--config", str(tmp_path / "missing.yaml")])
    assert "has no top-level 'eventbus:' section" in error_of(
        ["--config", write(tmp_path, "kafka:\n  brokers: x:1\n")]
    )
    assert "invalid YAML" in error_of(["--config", write(tmp_path, "eventbus: [unclosed\n")])
    assert "eventbus.pool: must be a mapping" in error_of(
        ["--config", write(tmp_path, "eventbus:\n  pool: 5\n")]
    )


def test_error_bad_set_syntax() -> None:
    assert "must be KEY.PATH=VALUE" in error_of(["--set", "pool.handler"])


def test_settings_model_direct_construction() -> None:
    s = Settings.model_validate({"kafka": {"brokers": ["a:1"]}})
    assert not s.embedded.enabled
    assert s.pool.retry.initial_backoff == 0.1
    assert s.pool.retry.max_backoff == 5.0


def test_error_no_broker_and_embedded_disabled() -> None:
    assert error_of(["--set", "embedded.enabled=false"]) == (
        "eventbus: no kafka.brokers configured and embedded.enabled is false: set one of them"
    )
    # brokers configured: embedded may be off (it is by default then)
    assert not load_settings(["--brokers", "k:9092"], {}).embedded.enabled
    # both: embedded wins (the entry point uses the embedded broker)
    assert load_settings(["--brokers", "k:9092", "--embedded"], {}).use_embedded_broker


def test_fetch_max_wait_is_settable_and_bounded() -> None:
    assert load_settings([], {}).kafka.consumer.fetch_max_wait_ms == 20
    s = load_settings(["--set", "kafka.consumer.fetchMaxWaitMs=250"], {})
    assert s.kafka.consumer.fetch_max_wait_ms == 250
    assert error_of(["--set", "kafka.consumer.fetchMaxWaitMs=-1"]).startswith(
        "eventbus.kafka.consumer.fetchMaxWaitMs:"
    )


def test_metrics_per_executor_is_off_by_default_and_set_by_yaml_env_and_flag(
    tmp_path: Path,
) -> None:
    assert load_settings([], {}).metrics.per_executor is False
    path = write(tmp_path, "eventbus:\n  metrics:\n    perExecutor: true\n")
    assert load_settings(["--config", path], {}).metrics.per_executor is True
    env = {"EVENTBUS__METRICS__PEREXECUTOR": "true"}
    assert load_settings([], env).metrics.per_executor is True
    assert load_settings(["--set", "metrics.perExecutor=false"], env).metrics.per_executor is False
    assert error_of(["--set", "metrics.perExecutor=maybe"]) == (
        "eventbus.metrics.perExecutor: must be true or false (got 'maybe')"
    )
