"""The CLI's options that set config fields come from the config models: the field's name, default and
description, and parsing the defaults builds the models' defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from schemas.config import (
    ControlConfig,
    InferenceConfig,
    ModelConfig,
    SecurityConfig,
    StackConfig,
    TrainingConfig,
)
from workers.cli import (
    HIDDEN_FIELD_PREFIX,
    SECURITY_OPTIONS,
    SEED_OPTIONS,
    STACK_OPTIONS,
    TRAINING_OPTIONS,
    WORKER_OPTIONS,
    _parser,
    config_from_args,
    stack_config,
)

# subcommand: (the shortest command line it takes, the config options it offers, the configs it builds)
SUBCOMMANDS = {
    "stack": (["stack", "up"], (SECURITY_OPTIONS, STACK_OPTIONS), (SecurityConfig,)),
    "worker": (["worker", "infer"], WORKER_OPTIONS, (InferenceConfig, ControlConfig)),
    "bench": (["bench"], (TRAINING_OPTIONS, SEED_OPTIONS), (ModelConfig, TrainingConfig)),
    "continual": (["continual"], (TRAINING_OPTIONS, SEED_OPTIONS), (ModelConfig, TrainingConfig)),
    "demo": (["demo"], (TRAINING_OPTIONS, STACK_OPTIONS), (TrainingConfig,)),
}
PORTS = ("kafka_port", "kafka_controller_port", "redis_port", "prometheus_port")


def _subparser(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_exposed_field_is_an_option_with_its_description(command):
    parser = _subparser(command)
    _, groups, _ = SUBCOMMANDS[command]
    for group in groups:
        for name in group.fields:
            info = group.model.model_fields[name]
            assert info.description, f"{group.model.__name__}.{name} needs a description"
            option = _option(parser, group.flag(name))
            assert option.dest == name and option.default == info.default
            if name.startswith(HIDDEN_FIELD_PREFIX):
                assert option.help == argparse.SUPPRESS and group.flag(name) not in parser.format_help()
            else:
                assert info.description in option.help


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_parsing_the_defaults_builds_the_models_defaults(command):
    argv, _, models = SUBCOMMANDS[command]
    args = _parser().parse_args(argv)
    for model in models:
        assert config_from_args(model, args) == model()


def test_parsed_values_reach_every_config_reading_the_option():
    args = _parser().parse_args(["worker", "control", "--transaction-timeout-ms", "2000", "--delivery",
                                 "at_least_once", "--training-root", "/data", "--fault-hang-category", "wood"])
    assert config_from_args(InferenceConfig, args).transaction_timeout_ms == 2000
    assert config_from_args(InferenceConfig, args).delivery == "at_least_once"
    control = config_from_args(ControlConfig, args)
    assert (control.transaction_timeout_ms, control.training_root, control.fault_hang_category) == (
        2000, Path("/data"), "wood")


def test_a_literal_field_takes_only_its_values():
    with pytest.raises(SystemExit):
        _parser().parse_args(["worker", "infer", "--delivery", "at_most_once"])


def test_stack_ports_default_to_the_state_folder_else_the_config(tmp_path):
    parser = _subparser("stack")
    for port in PORTS:
        option = _option(parser, STACK_OPTIONS.flag(port))
        info = StackConfig.model_fields[port]
        assert option.default is None and info.description in option.help and str(info.default) in option.help
    args = _parser().parse_args(["stack", "up", "--state-dir", str(tmp_path), "--auth"])
    assert stack_config(args) == StackConfig(state_dir=tmp_path, security=SecurityConfig(enabled=True))
