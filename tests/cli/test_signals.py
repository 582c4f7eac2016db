"""The command line's handling of SIGTERM: a command asked to stop unwinds like Ctrl-C."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from pipeline.cli.app import interrupt_on_sigterm


@pytest.fixture
def restore_sigterm() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_raises_keyboard_interrupt_so_a_rollout_undoes(restore_sigterm: None) -> None:
    """After the CLI's set-up, SIGTERM raises KeyboardInterrupt in the main thread: the path
    on which a rollout undoes every host it touched (the rollout table tests cover Ctrl-C)."""
    interrupt_on_sigterm()
    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler), handler  # not SIG_DFL: the process would just die, undoing nothing
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGTERM, None)
