"""The worker's command dispatch (`worker.commands.dispatch`): by exact type, and a command
no handler takes is an error that names it and what the worker handles."""

from __future__ import annotations

import pytest

from distserve_rt.core.scheduler import SchedulerConfig
from distserve_rt.worker.commands import AllocateKVCommand, MeasureKVCommand, dispatch


def test_a_command_goes_to_the_handler_of_its_type():
    seen = []
    handlers = {MeasureKVCommand: seen.append, AllocateKVCommand: lambda c: seen.append("x")}
    command = MeasureKVCommand(SchedulerConfig())
    dispatch(handlers, command)
    assert seen == [command]


def test_an_unknown_command_raises_naming_it_and_the_known_ones():
    handlers = {MeasureKVCommand: print, AllocateKVCommand: print}
    with pytest.raises(ValueError) as info:
        dispatch(handlers, ("step", "a tuple of the old protocol"))
    message = str(info.value)
    assert message.startswith("unknown worker command tuple (('step', 'a tuple of the old")
    assert message.endswith("this worker handles AllocateKVCommand, MeasureKVCommand")
