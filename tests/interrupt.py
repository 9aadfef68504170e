"""Presses Ctrl-C (SIGINT to this process) at the start of a chosen training step, for the Ctrl-C tests."""

import os
import signal


def interrupt_at(monkeypatch, step, when=lambda: True):
    """From now on, every training run gets a callback that sends SIGINT when `step` begins (and `when()`)."""
    from transformers import TrainerCallback

    from chatkit import engine

    original = engine.make_callbacks

    class SendInterrupt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step and when():
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(engine, "make_callbacks", lambda *a: original(*a) + [SendInterrupt()])
