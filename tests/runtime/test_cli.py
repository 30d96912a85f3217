"""The shared flag helpers of utils/runtime/cli.py."""

import argparse

import pytest

from utils.runtime.cli import add_backbone_flags, add_precision_flag, bool_flag


def options(parser):
    return {s for a in parser._actions for s in a.option_strings}


def test_backbone_flags_leave_the_input_size_to_scripts_that_declare_their_own():
    assert add_backbone_flags(argparse.ArgumentParser(), image_size=96).parse_args([]).image_size == 96
    without = add_backbone_flags(argparse.ArgumentParser(), image_size=None)
    assert "--image_size" not in options(without) and {"--arch", "--pretrained_weights"} <= options(without)


def test_precision_flag_has_main_dinos_choices_and_default(capsys):
    parser = add_precision_flag(argparse.ArgumentParser(), help_prefix="autocast of the backbone; ")
    assert parser.parse_args([]).precision == "auto"
    assert [parser.parse_args(["--precision", p]).precision for p in ("fp32", "fp16", "bf16")] == [
        "fp32",
        "fp16",
        "bf16",
    ]
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "value"), [("True", True), ("off", False), ("1", True), ("no", False)])
def test_bool_flag(text, value):
    assert bool_flag(text) is value
