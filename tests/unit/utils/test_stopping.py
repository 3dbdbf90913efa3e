"""attnrl.utils.stopping: a recorded stop signal is delivered again at a checkpoint, through the handler installed then."""

from __future__ import annotations

import signal

import pytest

from attnrl.utils import stopping


class Raised(Exception):
    pass


@pytest.fixture
def usr1():
    """SIGUSR1's handler raises ``Raised`` and notes whether the call was a delivery again."""
    calls: list[bool] = []

    def handler(signum, frame):
        calls.append(stopping.take_redelivery(signum))
        raise Raised

    previous = signal.signal(signal.SIGUSR1, handler)
    yield calls
    signal.signal(signal.SIGUSR1, previous)
    stopping.clear()


def test_a_checkpoint_without_a_recorded_signal_does_nothing(usr1):
    stopping.checkpoint()
    assert usr1 == []


def test_a_checkpoint_delivers_the_recorded_signal_again_from_its_own_frame(usr1):
    stopping.record(signal.SIGUSR1)
    with pytest.raises(Raised):
        stopping.checkpoint()
    assert usr1 == [True]  # the handler was told: a delivery again, not a new signal
    with pytest.raises(Raised):
        stopping.checkpoint()  # until the command that received it clears it
    stopping.clear()
    stopping.checkpoint()
    assert usr1 == [True, True]


def test_a_new_signal_is_not_taken_for_a_delivery_again(usr1):
    stopping.expect_redelivery(signal.SIGUSR1)
    assert stopping.take_redelivery(signal.SIGUSR1)
    with pytest.raises(Raised):
        signal.raise_signal(signal.SIGUSR1)
    assert usr1 == [False]
