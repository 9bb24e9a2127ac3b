"""The chaos runner's seed handling: a replayed seed runs alone, a failing seed is printed
with its replay command and makes the run exit 1 (the scenarios themselves run in the
integration suite with a random seed on every CI run)."""

from __future__ import annotations

import pytest

from tests.chaos import run_chaos


def test_a_failing_seed_prints_its_replay_command_and_fails_the_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[int] = []
    monkeypatch.setattr(run_chaos, "run_seed", lambda seed, products: ran.append(seed) or seed != 7)
    assert run_chaos.main(["--seed", "7"]) == 1
    assert ran == [7]
    assert "make chaos SEEDS=1 SEED=7" in capsys.readouterr().out


def test_n_seeds_run_and_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[int] = []
    monkeypatch.setattr(run_chaos, "run_seed", lambda seed, products: ran.append(seed) or True)
    assert run_chaos.main(["--seeds", "3"]) == 0
    assert len(ran) == 3


def test_unknown_products_are_refused() -> None:
    with pytest.raises(SystemExit):
        run_chaos.main(["--products", "simple_earn,nope"])


def test_every_scenario_names_an_existing_test_including_mixed() -> None:
    from pathlib import Path

    assert "mixed" in run_chaos.SCENARIOS
    root = Path(__file__).resolve().parents[2]
    for name, node in run_chaos.SCENARIOS.items():
        path, function = node.split("::")
        assert f"def {function}(" in (root / path).read_text(), name
