"""What the supervisor and the training process share, and nothing else.

`checkpoint/` (with the integrations) and `supervisor/` never import each
other; both import this package.  It owns:

- `protocol.py`: the env names `runner start` passes to the child and the
  control channel (signals, request/ack files, progress and commit reports);
- `lease.py`: the run lease in the bucket (one writer per run, fenced by a
  generation number): the supervisor takes it, the child's commits check it.

The protocol's names are re-exported here, so `from runner import control`
and `control.STOP` read as the protocol itself (child.py and the tests use
that spelling).
"""

from runner.control.protocol import (
    AUTO,
    ENV_BUCKET,
    ENV_CONTROL_DIR,
    ENV_INTERRUPTION_MTBF,
    ENV_KEEP_LAST,
    ENV_OBSERVED_INTERRUPTIONS,
    ENV_RESUME,
    ENV_RUN_ID,
    ENV_SAVE_EVERY_STEPS,
    ENV_STORAGE_OPTIONS,
    SAVE,
    SAVE_SIGNAL,
    SIGNAL_REQUEST_ID,
    STOP,
    STOP_SIGNAL,
    ChildChannel,
    Request,
    SupervisorChannel,
    decode_interruptions,
    encode_interruptions,
    install_signal_handlers,
    parse_save_every_steps,
    preemption_requested,
    reset_for_tests,
)

__all__ = [
    "AUTO",
    "ENV_BUCKET",
    "ENV_CONTROL_DIR",
    "ENV_INTERRUPTION_MTBF",
    "ENV_KEEP_LAST",
    "ENV_OBSERVED_INTERRUPTIONS",
    "ENV_RESUME",
    "ENV_RUN_ID",
    "ENV_SAVE_EVERY_STEPS",
    "ENV_STORAGE_OPTIONS",
    "SAVE",
    "SAVE_SIGNAL",
    "SIGNAL_REQUEST_ID",
    "STOP",
    "STOP_SIGNAL",
    "ChildChannel",
    "Request",
    "SupervisorChannel",
    "decode_interruptions",
    "encode_interruptions",
    "install_signal_handlers",
    "parse_save_every_steps",
    "preemption_requested",
    "reset_for_tests",
]
