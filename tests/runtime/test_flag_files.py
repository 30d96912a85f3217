"""``@FILE`` flag files (``configs/*.args``): the flags they hold parse exactly as the same flags typed out."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

import main_dino
from utils.runtime.cli import FlagFileParser

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str]):
    return FlagFileParser("DINO", parents=[main_dino.get_args_parser()], add_help=False).parse_args(argv)


def test_flag_file_equals_the_flags_typed_out_and_later_flags_override(tmp_path):
    flags = tmp_path / "recipe.args"
    flags.write_text("# a comment line\n--epochs 3   # trailing comment\n--global_crops_scale 0.3 0.9\n\n--lr 2e-3\n")
    typed = parse(["--epochs", "3", "--global_crops_scale", "0.3", "0.9", "--lr", "2e-3", "--lr", "1e-3"])
    from_file = parse([f"@{flags}", "--lr", "1e-3"])
    assert vars(from_file) == vars(typed)
    assert from_file.epochs == 3 and tuple(from_file.global_crops_scale) == (0.3, 0.9)
    assert from_file.lr == 1e-3


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.args")))
def test_each_shipped_config_parses_as_its_words(name):
    """Every shipped config parses, and equals its words (comments dropped by the shell's rule) typed out."""
    path = ROOT / "configs" / name
    words = shlex.split(path.read_text(), comments=True)
    assert words, f"{name} holds no flags"
    assert vars(parse([f"@{path}"])) == vars(parse(words))


def test_quickstart_config_sets_what_the_readme_says():
    args = parse([f"@{ROOT / 'configs' / 'quickstart.args'}"])
    expected = dict(
        dataset="synthetic",
        output_dir="runs/quickstart",
        epochs=6,
        global_crop_size=32,
        local_crop_size=16,
        out_dim=4096,
        batch_size_per_gpu=64,
        lr=2e-3,
        warmup_epochs=1,
        freeze_last_layer=0,
        momentum_teacher=0.99,
        knn_every=6,
        koleo_loss_weight=1.0,
    )
    assert {key: getattr(args, key) for key in expected} == expected


def test_missing_flag_file_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["@/nowhere/recipe.args"])
    assert exc.value.code == 2
    assert "/nowhere/recipe.args" in capsys.readouterr().err
