"""The CLI handles SIGTERM and SIGHUP like Ctrl-C: one line, exit 128 + signal, handlers restored after."""

from __future__ import annotations

import os
import signal

import pytest

from jaxreshard import cli


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_a_command_is_an_interruption(sig, monkeypatch, capsys):
    seen = []

    def interrupted_run(task, opts):
        seen.append(signal.getsignal(signal.SIGTERM))
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal should have interrupted the command")

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    monkeypatch.setattr(cli, "run", interrupted_run)
    assert cli.main(["convert", "--src", "x", "--dst", "y"]) == 128 + sig
    assert capsys.readouterr().err == (f"jaxreshard: interrupted by {signal.Signals(sig).name}; this run's "
                                       "temporary files were removed\n")
    assert seen == [cli._on_signal]
    assert {s: signal.getsignal(s) for s in before} == before, "the caller's handlers are back"
