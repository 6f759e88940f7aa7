"""The voice example: real features, real learning, modules that load on their own.

Everything runs in this process on CPU with the example's own small model;
the whole file takes a few seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchaudio

import runner
from runner.examples import voice

CFG = voice.VoiceConfig(seed=3)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch):
    """No RUNNER_* settings from the machine; torch's global settings given back afterwards."""
    for key in [k for k in os.environ if k.startswith("RUNNER_")]:
        monkeypatch.delenv(key)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def dataset() -> voice.VoiceDataset:
    # Built before the autouse fixture pins one thread (a module fixture comes first): pin it here too,
    # since the mel filterbank's reductions round by thread count and the tests compare bitwise.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return voice.build_dataset(CFG)
    finally:
        torch.set_num_threads(threads)


def test_mel_features_are_torchaudio_log_mels_of_the_synthesized_audio(dataset: voice.VoiceDataset) -> None:
    transform = voice.log_mel_transform(CFG)
    assert isinstance(transform[0], torchaudio.transforms.MelSpectrogram)
    assert isinstance(transform[1], torchaudio.transforms.AmplitudeToDB)

    audio, speakers = voice.synthesize_corpus(CFG)
    assert len(audio) == len(dataset) == CFG.speakers * CFG.utterances_per_speaker
    assert dataset.speakers.tolist() == speakers
    for index in (0, len(audio) - 1):
        wave = audio[index]
        assert 0.5 <= wave.numel() / CFG.sample_rate <= 3.0  # about 1-2 s at 32 kHz
        expected = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=80.0)(
            torchaudio.transforms.MelSpectrogram(
                sample_rate=CFG.sample_rate, n_fft=CFG.n_fft, hop_length=CFG.hop_length, n_mels=CFG.n_mels
            )(wave)
        )
        assert dataset.mels[index].shape == (CFG.n_mels, wave.numel() // CFG.hop_length + 1)
        # The dataset holds them globally standardized: equal up to one affine map.
        standardized = (expected - expected.mean()) / expected.std()
        got = dataset.mels[index]
        torch.testing.assert_close((got - got.mean()) / got.std(), standardized, atol=1e-4, rtol=1e-4)


def test_data_is_deterministic_from_the_seed(dataset: voice.VoiceDataset) -> None:
    again = voice.build_dataset(CFG)
    other = voice.build_dataset(voice.VoiceConfig(seed=CFG.seed + 1))
    assert all(torch.equal(a, b) for a, b in zip(again.mels, dataset.mels))
    assert not torch.equal(other.mels[0][:, :50], dataset.mels[0][:, :50])


def test_semantic_tokens_are_read_off_the_audio(dataset: voice.VoiceDataset) -> None:
    tokens = torch.cat(dataset.tokens)
    assert tokens.min() >= 0 and tokens.max() < CFG.vocab
    assert (tokens == voice.SILENCE).any(), "pauses between syllables are silence tokens"
    assert len(tokens.unique()) >= 8, "the strongest band follows the notes"
    first = dataset.tokens[0]
    assert first.shape == (dataset.mels[0].shape[1],)


def test_the_example_learns_both_modules_on_its_own_data() -> None:
    w = voice.build_workload(CFG)
    losses = [voice.train_step(w) for _ in range(80)]
    first, last = losses[:10], losses[-10:]

    def mean(values):
        return sum(values) / len(values)

    assert mean([x.gpt for x in last]) < 0.5 * mean([x.gpt for x in first])
    assert mean([x.sovits for x in last]) < 0.7 * mean([x.sovits for x in first])


def test_batches_resume_mid_epoch_exactly(dataset: voice.VoiceDataset) -> None:
    batches = voice.ResumableBatches(dataset, batch_size=8, segment_frames=32, seed=5)
    for _ in range(8):  # into the second epoch (48 utterances, 6 batches each)
        batches.next_batch()
    saved = batches.state_dict()
    expected = [batches.next_batch() for _ in range(7)]

    resumed = voice.ResumableBatches(dataset, batch_size=8, segment_frames=32, seed=99)
    resumed.load_state_dict(saved)
    assert (resumed.epoch, resumed.position) == (1, 16)
    for want in expected:
        got = resumed.next_batch()
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.mels, want.mels)
        assert torch.equal(got.speakers, want.speakers)


def test_batches_refuse_a_position_saved_for_other_data(dataset: voice.VoiceDataset) -> None:
    state = voice.ResumableBatches(dataset, batch_size=8, segment_frames=32, seed=5).state_dict()
    with pytest.raises(ValueError, match="batches of 8"):
        voice.ResumableBatches(dataset, batch_size=4, segment_frames=32, seed=5).load_state_dict(state)


def _train_and_finish(bucket: str, steps: int) -> voice.Workload:
    w = voice.build_workload(CFG)
    ckpt = runner.Checkpointer(
        bucket, run_id="solo", save_every_steps=2, gpt=w.gpt, sovits=w.sovits, optimizer=w.optimizer,
        scheduler=w.scheduler, data=w.batches, extra={"seed": CFG.seed},
    )  # fmt: skip
    assert ckpt.restore() == 0
    for step in range(1, steps + 1):
        voice.train_step(w)
        ckpt.step(step, epoch=w.batches.epoch)
    ckpt.save(steps, epoch=w.batches.epoch, final=True)
    ckpt.close()
    return w


def _fresh(build, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(CFG)


@pytest.mark.parametrize("name", ["gpt", "sovits"])
def test_each_module_restores_on_its_own(tmp_path: Path, name: str) -> None:
    trained = getattr(_train_and_finish(str(tmp_path / "bucket"), steps=5), name)
    fresh = _fresh(voice.build_gpt if name == "gpt" else voice.build_sovits, seed=1234)
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))

    alone = runner.Checkpointer(str(tmp_path / "bucket"), run_id="solo", **{name: fresh})
    assert alone.restore() == 5
    alone.close()
    assert fresh.state_dict().keys() == trained.state_dict().keys()
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_finished_run_is_not_trained_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--bucket", str(tmp_path / "bucket"), "--steps", "6", "--log-every", "0", "--threads", "1"]
    assert voice.main([*args, "--fingerprint-out", str(tmp_path / "first.json")]) == 0
    assert voice.main([*args, "--fingerprint-out", str(tmp_path / "again.json")]) == 0
    assert "already finished at step 6" in capsys.readouterr().out
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads((tmp_path / "first.json").read_text())


def test_resuming_with_another_seed_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--bucket", str(tmp_path / "bucket"), "--steps", "3", "--log-every", "0", "--threads", "1"]
    assert voice.main([*args, "--seed", "1"]) == 0
    assert voice.main([*args, "--seed", "2", "--steps", "6"]) == 2
    assert "was started with --seed 1" in capsys.readouterr().err
