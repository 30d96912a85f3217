"""The mutation check itself: a mutant that its test kills is reported killed by that test, a no-op change survives,
a pattern that is not in its file is an error (never a kill), and the working tree is left untouched."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "tools" / "mutation_check.py")
mutation_check = importlib.util.module_from_spec(spec)
sys.modules.setdefault("mutation_check", mutation_check)  # dataclasses look their module up there
spec.loader.exec_module(mutation_check)
Mutant = mutation_check.Mutant

CENTRE_TEST = "tests/train/test_dino_semantics.py::test_centre_is_an_ema_of_the_teacher_batch_mean"
KILLED = Mutant(
    "centre_momentum_swapped",
    "utils/train/loss.py",
    "self.center * self.center_momentum + batch_center * (1 - self.center_momentum)",
    "self.center * (1 - self.center_momentum) + batch_center * self.center_momentum",
    (CENTRE_TEST,),
)
SURVIVES = Mutant(  # a change without a change of meaning
    "no_op",
    "utils/train/loss.py",
    "batch_center * (1 - self.center_momentum)",
    "(1 - self.center_momentum) * batch_center",
    (CENTRE_TEST,),
)
UNMATCHED = Mutant("moved_code", "utils/train/loss.py", "this text is not in loss.py", "x", (CENTRE_TEST,))


CHECK = """
import sys
sys.path.insert(0, "tools")
import mutation_check as m
mutants = tuple(m.Mutant(*fields) for fields in {fields!r})
sys.exit(m.main(["--no-baseline", "--jobs", "2"], mutants=mutants))
"""


@pytest.mark.slow  # a checker process and two forked pytest runs: ~20 s on a busy 2-core CPU
def test_killed_survived_and_unmatched_mutants():
    """Run as a user would (a fresh process: one forked child per mutant)."""
    loss_file = ROOT / "utils" / "train" / "loss.py"
    before = hashlib.sha1(loss_file.read_bytes()).hexdigest()
    fields = [(m.name, m.file, m.pattern, m.replacement, m.tests) for m in (KILLED, SURVIVES, UNMATCHED)]
    proc = subprocess.run(
        [sys.executable, "-c", CHECK.format(fields=fields)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert hashlib.sha1(loss_file.read_bytes()).hexdigest() == before
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    results = {r["name"]: r for r in summary["results"]}
    assert results["centre_momentum_swapped"]["status"] == "killed"
    assert results["centre_momentum_swapped"]["killer"] == CENTRE_TEST
    assert results["no_op"]["status"] == "survived"
    assert results["moved_code"]["status"] == "error"
    assert "found 0 times" in results["moved_code"]["killer"]
    assert (summary["killed"], summary["survived"], summary["error"]) == (1, 1, 1)
    assert proc.returncode == 1
    assert "centre_momentum_swapped" in proc.stdout and "moved_code" in proc.stdout  # the table


def test_failing_tests_are_read_from_pytests_summary():
    output = "..F\n=== short test summary info ===\nFAILED tests/a/test_x.py::test_y[1-2] - AssertionError: no\n"
    output += "ERROR tests/b/test_z.py - ImportError\n"
    assert mutation_check.failing_tests(output) == ["tests/a/test_x.py::test_y[1-2]", "tests/b/test_z.py"]


def test_every_listed_mutant_pattern_is_in_its_file_once():
    """The list is current: a pattern that the library no longer contains would be an error row."""
    for mutant in mutation_check.MUTANTS:
        source = (ROOT / mutant.file).read_text(encoding="utf-8")
        assert source.count(mutant.pattern) == 1, mutant.name
        assert mutant.pattern != mutant.replacement
    assert len(mutation_check.MUTANTS) >= 20
    assert len({m.name for m in mutation_check.MUTANTS}) == len(mutation_check.MUTANTS)
