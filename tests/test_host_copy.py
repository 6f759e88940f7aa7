"""The kept host copy is chosen by size: kept below a share of physical memory, dropped above it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import runner
from runner.checkpoint import state


def test_buffers_keep_a_capture_up_to_their_limit_only() -> None:
    model = nn.Linear(64, 64)  # 64*64*4 + 64*4 = 16,640 bytes of tensors
    size = state.tensor_bytes(model.state_dict())
    assert size == 64 * 64 * 4 + 64 * 4
    captured = state.tensor_bytes(state.capture({"model": model}))  # the model and the RNG streams
    assert captured > size
    roomy, tight = state.HostBuffers(limit_bytes=captured), state.HostBuffers(limit_bytes=captured - 1)
    for buffers in (roomy, tight):
        buffers.give_back(state.capture({"model": model}, buffers))
    assert roomy.take() is not None and roomy.refused_bytes is None
    assert tight.take() is None and tight.refused_bytes == captured


def test_tensor_bytes_counts_nested_tensors_of_every_dtype() -> None:
    nested = {"a": [torch.zeros(10, dtype=torch.float16), (torch.zeros(3, dtype=torch.int64),)], "b": 7, "c": "x"}
    assert state.tensor_bytes(nested) == 10 * 2 + 3 * 8


def test_default_limit_is_a_share_of_physical_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert state.host_copy_limit() == int(total * state.HOST_COPY_RAM_FRACTION)
    monkeypatch.setattr(state, "HOST_COPY_RAM_FRACTION", 0.5)
    assert state.host_copy_limit() == int(total * 0.5)


def _capture_reuses(ckpt: runner.Checkpointer, model: nn.Module) -> bool:
    """Two periodic saves; True when the second capture copied into the first one's memory."""
    ckpt.step(1)
    first = ckpt.wait()
    assert first is not None
    taken = ckpt._host_buffers.take() if ckpt._host_buffers is not None else None
    if taken is not None:
        ckpt._host_buffers.give_back(taken)
    return taken is not None


@pytest.mark.parametrize("keep, fraction, kept", [
    (None, 0.25, True),      # default: a small state is kept
    (None, 1e-12, False),    # default: a state over the limit is not
    (True, 1e-12, True),     # True keeps any size
    (False, 0.25, False),    # False never keeps
])
def test_checkpointer_keeps_the_host_copy_by_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog,
                                                  keep: bool | None, fraction: float, kept: bool) -> None:
    monkeypatch.setattr(state, "HOST_COPY_RAM_FRACTION", fraction)
    model = nn.Linear(32, 32)
    with caplog.at_level(logging.INFO, logger="runner.checkpoint"):
        ckpt = runner.Checkpointer(str(tmp_path / "b"), run_id="r", save_every_steps=1, keep_host_copy=keep,
                                   model=model)
        assert _capture_reuses(ckpt, model) is kept
        with torch.no_grad():
            model.weight.add_(1.0)
        ckpt.step(2)
        ckpt.close()
    refused = [r for r in caplog.records if "over the host copy limit" in r.getMessage()]
    assert len(refused) == (1 if keep is None and not kept else 0)  # said once, not at every save
    fresh = nn.Linear(32, 32)
    assert runner.Checkpointer(str(tmp_path / "b"), run_id="r", model=fresh).restore() == 2
    assert torch.equal(fresh.weight, model.weight)
