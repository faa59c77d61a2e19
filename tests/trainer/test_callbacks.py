"""The loop's test seam: the driver checks the callbacks it is asked to pass to the workers."""

from __future__ import annotations

import pytest

from kubetune_trainer.callbacks import CALLBACKS_ENV, callback_names_from_env, load_callbacks
from kubetune_trainer.errors import ConfigError
from tests.support import trainer_faults

FAULTS = trainer_faults.__name__


def test_the_fault_callback_loads_by_the_name_the_tests_give(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CALLBACKS_ENV, trainer_faults.FAIL_ONCE_AFTER_FIRST_EPOCH[CALLBACKS_ENV])
    names = callback_names_from_env()
    assert load_callbacks(names) == [trainer_faults.fail_once_after_first_epoch]


def test_without_the_variable_the_loop_gets_no_callbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CALLBACKS_ENV, raising=False)
    assert callback_names_from_env() == ()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("no_such_module_here:f", "cannot load 'no_such_module_here:f'"),
        (f"{FAULTS}:missing", f"cannot load '{FAULTS}:missing'"),
        (FAULTS, f"'{FAULTS}' is not a function (expected module:function)"),
        (f"{FAULTS}:FAIL_AFTER_EPOCH", "is not a function"),
    ],
)
def test_a_wrong_callback_name_ends_the_run_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    monkeypatch.setenv(CALLBACKS_ENV, value)
    with pytest.raises(ConfigError, match=f"^{CALLBACKS_ENV}: .*") as error:
        callback_names_from_env()
    assert says in str(error.value)
