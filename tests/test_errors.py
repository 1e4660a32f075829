"""One line for user errors, a traceback for everything else, ``MSAD_JAX_DEBUG`` for both."""

import pytest

from msad_jax.checkpointing import CheckpointError
from msad_jax.config import ConfigError
from msad_jax.errors import InputError, MissingInputError, UserError, user_errors
from msad_jax.models import PretrainedWeightsError, StateDictMismatchError
from msad_jax.models.weight_files import WeightFileError
from msad_jax.train import TrainingDivergedError
from msad_jax.workdir import WorkdirBusyError


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("config.x is\nwrong"),
        CheckpointError("checkpoint is damaged"),
        PretrainedWeightsError("weights missing"),
        StateDictMismatchError("keys differ"),
        WeightFileError("corrupt file"),
        TrainingDivergedError("loss became nan"),
        WorkdirBusyError("another run"),
        InputError("bad image"),
        MissingInputError("no such folder"),
    ],
)
def test_user_errors_are_one_line_and_exit_status_1(error, capsys, monkeypatch):
    monkeypatch.delenv("MSAD_JAX_DEBUG", raising=False)
    assert isinstance(error, UserError)
    with pytest.raises(SystemExit) as exit_info, user_errors():
        raise error
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err == f"error: {' '.join(str(error).split())}\n"


@pytest.mark.parametrize("error", [ValueError("bug"), RuntimeError("RESOURCE_EXHAUSTED: oom")])
def test_other_errors_keep_their_traceback(error, monkeypatch):
    monkeypatch.delenv("MSAD_JAX_DEBUG", raising=False)
    with pytest.raises(type(error)) as raised, user_errors():
        raise error
    assert raised.value is error


def test_debug_switch_shows_user_errors_with_their_traceback(monkeypatch):
    monkeypatch.setenv("MSAD_JAX_DEBUG", "1")
    with pytest.raises(ConfigError), user_errors():
        raise ConfigError("config.x is wrong")


def test_user_errors_still_are_the_builtin_kinds_callers_catch():
    assert issubclass(ConfigError, ValueError) and issubclass(InputError, ValueError)
    assert issubclass(MissingInputError, FileNotFoundError)
    assert issubclass(CheckpointError, RuntimeError)
