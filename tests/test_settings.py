import argparse

import pytest

from worker import settings as settings_mod
from worker.cli import build_parser
from worker.errors import ConfigError


def test_flags_over_env_over_defaults():
    env = {"WORKER_MAX_BATCH_SIZE": "64", "WORKER_INPUT_TOPIC": "from-env", "WORKER_ORT_ARENA": "false"}
    s = settings_mod.load({"input_topic": "from-flag", "max_batch_size": None}, environ=env)
    assert s.input_topic == "from-flag"
    assert s.max_batch_size == 64
    assert s.ort_arena is False
    assert s.output_topic == "results"


def test_bad_values_are_specific():
    with pytest.raises(ConfigError, match=r"max_batch_size: cannot read 'lots' as int .*WORKER_MAX_BATCH_SIZE"):
        settings_mod.load({}, environ={"WORKER_MAX_BATCH_SIZE": "lots"})
    with pytest.raises(ConfigError, match=r"max_batch_size must be >= 1, got 0"):
        settings_mod.load({}, environ={"WORKER_MAX_BATCH_SIZE": "0"})
    with pytest.raises(ConfigError, match=r"hybrid_card_below must be >= 0, got -1"):
        settings_mod.load({}, environ={"WORKER_HYBRID_CARD_BELOW": "-1"})
    with pytest.raises(ConfigError, match=r"device='tpu' is not one of auto, cuda, cpu"):
        settings_mod.load({}, environ={"WORKER_DEVICE": "tpu"})
    with pytest.raises(ConfigError, match=r"resume_in_flight=9 must not exceed max_in_flight=8"):
        settings_mod.load({}, environ={}, max_in_flight=8, resume_in_flight=9)


def test_secrets_are_masked_and_passed_to_aiokafka():
    s = settings_mod.load({}, environ={"WORKER_SASL_PASSWORD": "hunter2", "WORKER_SASL_USERNAME": "bob",
                                       "WORKER_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                                       "WORKER_SASL_MECHANISM": "SCRAM-SHA-512"})
    assert s.masked()["sasl_password"] == "***" and s.masked()["sasl_username"] == "bob"
    assert "hunter2" not in repr(s.masked())
    opts = s.kafka_common()
    assert opts["security_protocol"] == "SASL_PLAINTEXT"
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert opts["sasl_plain_username"] == "bob" and opts["sasl_plain_password"] == "hunter2"


def test_derived_values():
    s = settings_mod.load({}, environ={}, max_in_flight=100)
    assert s.resume_threshold == 50
    assert s.decode_threads >= 1


def test_run_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(settings_mod.Settings):
        assert "--" + f.name.replace("_", "-") in text
        assert "WORKER_" + f.name.upper() in text


def test_cli_flags_reach_settings():
    args = build_parser().parse_args(["run", "--max-wait-ms", "2.5", "--device", "cpu"])
    s = settings_mod.load(vars(args), environ={})
    assert s.max_wait_ms == 2.5 and s.device == "cpu"
    assert isinstance(args, argparse.Namespace)


def test_choices_become_enum_members_wherever_they_enter():
    from worker.choices import Choice, Decoder, Device, LogLevel, SaslMechanism

    s = settings_mod.load({"decoder": "hybrid"}, environ={"WORKER_DEVICE": " CPU ", "WORKER_LOG_LEVEL": "Debug",
                                                        "WORKER_SASL_MECHANISM": "scram-sha-256"})
    assert s.decoder is Decoder.HYBRID and s.device is Device.CPU and s.log_level is LogLevel.DEBUG
    assert s.sasl_mechanism is SaslMechanism.SCRAM_SHA_256
    assert s.decoder == "hybrid" and f"{s.decoder}" == "hybrid" and {"hybrid": 1}[s.decoder] == 1
    assert s.decodes_on_gpu and settings_mod.GPU_DECODERS == ("nvimgcodec", "hybrid")
    replaced = s.replace(decoder="cpu-reduced")  # callers and tests pass plain strings
    assert replaced.decoder is Decoder.CPU_REDUCED and not replaced.decodes_on_gpu
    import dataclasses

    for f in dataclasses.fields(settings_mod.Settings):  # every field with choices is typed, default included
        if f.metadata.get("choices"):
            assert isinstance(getattr(settings_mod.Settings(), f.name), Choice), f.name


def test_a_bad_choice_names_its_flag_variable_and_values():
    with pytest.raises(ConfigError, match=r"decoder='gpu' is not one of cpu, cpu-reduced, nvimgcodec, hybrid "
                                          r"\(flag --decoder or env WORKER_DECODER\)"):
        settings_mod.load({}, environ={"WORKER_DECODER": "gpu"})
    with pytest.raises(ConfigError, match=r"ort_batch_shapes='any' is not one of max, pow2 .*"
                                          r"; log_format='xml' is not one of auto, json, console"):
        settings_mod.Settings().replace(log_format="xml", ort_batch_shapes="any")


def test_kafka_options_are_plain_strings():
    opts = settings_mod.load({}, environ={"WORKER_SECURITY_PROTOCOL": "sasl_plaintext"}).kafka_common()
    assert type(opts["security_protocol"]) is str and opts["security_protocol"] == "SASL_PLAINTEXT"
    assert type(opts["sasl_mechanism"]) is str and opts["sasl_mechanism"] == "PLAIN"


def test_check_crcs_is_read_and_reaches_the_consumer():
    import asyncio
    from types import SimpleNamespace

    from worker.app import Worker
    from worker.models import default_pipeline_path
    from worker.models.spec import load_pipeline

    assert settings_mod.load({}, environ={}).check_crcs is True  # Kafka's Java consumer's default
    s = settings_mod.load({}, environ={"WORKER_CHECK_CRCS": "false"})
    assert s.check_crcs is False

    async def consumer_flag(settings):
        worker = Worker(settings, load_pipeline(default_pipeline_path()), SimpleNamespace())
        worker._new_clients()  # made, not started: no broker needed
        try:
            return worker.consumer._check_crcs
        finally:
            await worker.consumer.stop()
            await worker.publisher._producer.stop()

    assert asyncio.run(consumer_flag(s)) is False
    assert asyncio.run(consumer_flag(settings_mod.load({}, environ={}))) is True


def test_gil_switch_interval_is_set_for_the_calling_process_and_zero_leaves_it():
    import sys

    from worker.service import set_gil_switch_interval

    before = sys.getswitchinterval()
    try:
        set_gil_switch_interval(settings_mod.Settings(gil_switch_interval_ms=0))
        assert sys.getswitchinterval() == before
        set_gil_switch_interval(settings_mod.Settings(gil_switch_interval_ms=0.5))
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)
