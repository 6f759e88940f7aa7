"""The voice example: a tiny GPT-SoVITS-shaped model trained with the Checkpointer.

Owns the demo workload and nothing the runner itself needs: speech-like audio
it synthesizes itself (no downloads), log-mel features computed with
torchaudio, semantic tokens derived from that audio, the two modules (``gpt``:
semantic next-token model; ``sovits``: semantic tokens + speaker -> mel
frames), a resumable batch iterator, and a training loop wired to
``runner.Checkpointer``. ``python -m runner.examples.voice`` trains it on one
CPU core in about a minute; ``--help`` lists the knobs.

Why it is built this way:

- Exact resume is the point. Everything that changes while training is either
  a registered component (the two modules, the optimizer, the scheduler, the
  batch iterator with its own ``torch.Generator``) or an RNG stream the
  Checkpointer captures (dropout draws from torch's global generator).
  Nothing draws random numbers between a save and the next step, and the
  intra-op thread count is pinned because CPU kernels split reductions by
  thread count. With that, a run interrupted any number of times ends with
  parameters and optimizer state bitwise equal to a straight run.
- One Adam with one parameter group per module, and one scheduler. A single
  optimizer/scheduler pair keeps the loop plain while per-module learning
  rates stay possible. The modules are separate components, so either can be
  restored on its own (``Checkpointer(bucket, run_id=..., gpt=fresh_gpt)``);
  the optimizer's moments are only meaningful together with both.
- The LR schedule is ``LambdaLR`` around a small callable object rather than a
  lambda: ``LambdaLR.state_dict()`` saves such an object's attributes, so the
  warmup/decay settings travel with the snapshot, and the LR is a closed-form
  function of the step, so nothing accumulates across a resume.

Why it is long: it is the example users read and copy, so model, data,
training loop and the Checkpointer calls stay in one file on purpose.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio
from torch import Tensor, nn
from torch.nn import functional as F

import runner
from runner.errors import ConfigError, SnapshotNotFoundError, StateMismatchError, StorageError

# Sentinel token for frames with no voiced sound; pitch tokens start at 1.
SILENCE = 0
# Semitone offsets of the notes a "syllable" can sing (one octave, major scale).
SCALE = (0, 2, 4, 5, 7, 9, 11, 12)
# Samples in one period of the wavetable the syllables are read from.
_TABLE_SIZE = 2048


@dataclass(frozen=True)
class VoiceConfig:
    """Sizes of the data and the model; 2500 steps of the defaults take about a minute on one core."""

    seed: int = 0
    sample_rate: int = 32_000  # GPT-SoVITS trains on 32 kHz audio
    n_fft: int = 1024
    hop_length: int = 320  # 10 ms frames
    n_mels: int = 64
    pitch_tokens: int = 32  # mel bins 0..31 cover the fundamentals we synthesize
    speakers: int = 4
    utterances_per_speaker: int = 12
    segment_frames: int = 64  # training crops: 0.64 s
    batch_size: int = 8
    d_model: int = 64
    dropout: float = 0.1
    lr: float = 3e-3
    warmup_steps: int = 20
    half_life_steps: int = 1000

    @property
    def vocab(self) -> int:
        return self.pitch_tokens + 1  # + SILENCE


# --------------------------------------------------------------------------
# Data: synthetic speakers, utterances, log-mels and semantic tokens


@dataclass(frozen=True)
class Speaker:
    f0: float  # base pitch in Hz
    formants: tuple[float, float]  # resonance centres in Hz
    noise: float  # breath/background noise amplitude


@dataclass(frozen=True)
class VoiceDataset:
    """Log-mel frames (normalized), semantic tokens and speaker id per utterance."""

    mels: list[Tensor]  # each (n_mels, frames)
    tokens: list[Tensor]  # each (frames,), int64
    speakers: Tensor  # (utterances,), int64

    def __len__(self) -> int:
        return len(self.mels)

    @property
    def lengths(self) -> list[int]:
        return [m.shape[1] for m in self.mels]


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=gen).item()


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """An int in [low, high)."""
    return int(torch.randint(low, high, (), generator=gen).item())


def make_speakers(count: int, gen: torch.Generator) -> list[Speaker]:
    speakers = []
    for i in range(count):
        # Spread base pitches over ~1.5 octaves so speakers differ audibly.
        f0 = 110.0 * 2 ** (i * 1.5 / max(count - 1, 1)) * _uniform(gen, 0.97, 1.03)
        formants = (_uniform(gen, 500, 900), _uniform(gen, 1200, 2600))
        speakers.append(Speaker(f0=f0, formants=formants, noise=_uniform(gen, 0.002, 0.01)))
    return speakers


@functools.lru_cache(maxsize=None)
def _wavetable(speaker: Speaker, f0: float, sample_rate: int) -> Tensor:
    """One period of the speaker's voice at pitch f0, summed from its partials."""
    harmonics = torch.arange(1, min(40, int(0.45 * sample_rate / f0)) + 1, dtype=torch.float64)
    freqs = harmonics * f0
    # 1/h tilt keeps the fundamental prominent; the formant bumps give each
    # speaker its timbre.
    gain = (0.3 + sum(torch.exp(-(((freqs - f) / 250.0) ** 2)) for f in speaker.formants)) / harmonics
    grid = torch.arange(_TABLE_SIZE + 1, dtype=torch.float64) * (2 * math.pi / _TABLE_SIZE)
    return (gain[:, None] * torch.sin(harmonics[:, None] * grid[None, :])).sum(0)


def _syllable(speaker: Speaker, semitone: int, seconds: float, sample_rate: int) -> Tensor:
    """A harmonic tone with the speaker's formants and a smooth envelope.

    Wavetable synthesis (one cached period per speaker and note, read with
    linear interpolation) rather than a sine per partial per sample: the
    corpus then takes a fraction of a second to build.
    """
    f0 = speaker.f0 * 2 ** (semitone / 12)
    table = _wavetable(speaker, f0, sample_rate)
    n = int(seconds * sample_rate)
    position = (torch.arange(n, dtype=torch.float64) * (f0 / sample_rate)).frac() * _TABLE_SIZE
    index = position.long()
    frac = position - index
    wave = table[index] * (1 - frac) + table[index + 1] * frac
    envelope = torch.sin(torch.linspace(0, math.pi, n, dtype=torch.float64)) ** 0.5
    return (wave * envelope).float()


def synthesize_utterance(speaker: Speaker, sample_rate: int, gen: torch.Generator) -> Tensor:
    """About 1-2 s of 'speech': a melodic random walk of syllables with short pauses, plus noise."""
    pieces = []
    note = _randint(gen, 0, len(SCALE))
    for _ in range(_randint(gen, 7, 13)):
        note = min(max(note + _randint(gen, -2, 3), 0), len(SCALE) - 1)
        pieces.append(_syllable(speaker, SCALE[note], _uniform(gen, 0.08, 0.2), sample_rate))
        if torch.rand((), generator=gen).item() < 0.4:
            pieces.append(torch.zeros(int(_uniform(gen, 0.03, 0.1) * sample_rate)))
    audio = torch.cat(pieces)
    audio = audio / audio.abs().max() * 0.5
    return audio + speaker.noise * torch.randn(audio.shape, generator=gen)


def semantic_tokens(mel_db: Tensor, pitch_tokens: int) -> Tensor:
    """Per-frame tokens read off the audio: 1 + the strongest mel band, or SILENCE.

    The strongest band moves with the sung note and the speaker's formants.
    Stands in for GPT-SoVITS' quantized HuBERT features: discrete, derived
    from the sound, predictable from context.
    """
    loudness = mel_db.max(dim=0).values
    voiced = loudness > loudness.max() - 30.0
    pitch = mel_db.argmax(dim=0).clamp(max=pitch_tokens - 1) + 1
    return torch.where(voiced, pitch, torch.full_like(pitch, SILENCE))


def synthesize_corpus(cfg: VoiceConfig) -> tuple[list[Tensor], list[int]]:
    """Waveforms and their speaker ids; deterministic from ``cfg.seed``.

    Uses its own generator, never the global one, so building the data does
    not shift the draws that initialize the model.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    audio, speaker_ids = [], []
    for speaker_id, speaker in enumerate(make_speakers(cfg.speakers, gen)):
        for _ in range(cfg.utterances_per_speaker):
            audio.append(synthesize_utterance(speaker, cfg.sample_rate, gen))
            speaker_ids.append(speaker_id)
    return audio, speaker_ids


def log_mel_transform(cfg: VoiceConfig) -> nn.Sequential:
    """torchaudio's mel spectrogram in dB: waveform (samples,) -> (n_mels, frames)."""
    return nn.Sequential(
        torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels
        ),
        torchaudio.transforms.AmplitudeToDB(stype="power", top_db=80.0),
    )


def build_dataset(cfg: VoiceConfig) -> VoiceDataset:
    """Synthesize the corpus, then log-mels and semantic tokens for every utterance."""
    audio, speaker_ids = synthesize_corpus(cfg)
    to_log_mel = log_mel_transform(cfg)
    mels = [to_log_mel(wave) for wave in audio]
    tokens = [semantic_tokens(mel_db, cfg.pitch_tokens) for mel_db in mels]
    # One global normalization so the acoustic loss is O(1) at the start.
    frames = torch.cat(mels, dim=1)
    mean, std = frames.mean(), frames.std()
    mels = [(m - mean) / std for m in mels]
    return VoiceDataset(mels=mels, tokens=tokens, speakers=torch.tensor(speaker_ids))


# --------------------------------------------------------------------------
# Resumable batches: the `data` component


@dataclass(frozen=True)
class Batch:
    tokens: Tensor  # (B, T) int64
    mels: Tensor  # (B, n_mels, T)
    speakers: Tensor  # (B,) int64


class ResumableBatches:
    """Shuffled fixed-length crops, epoch by epoch, resumable mid-epoch.

    Its state is the epoch, the position in this epoch's permutation, the
    permutation itself and its own ``torch.Generator`` (which also draws the
    crop offsets), so a restored iterator yields exactly the batches the
    uninterrupted one would have. Incomplete trailing batches are dropped.
    """

    def __init__(self, dataset: VoiceDataset, batch_size: int, segment_frames: int, seed: int) -> None:
        if batch_size > len(dataset):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(dataset)} utterances")
        if segment_frames > min(dataset.lengths):
            raise ValueError(f"segment_frames {segment_frames} exceeds the shortest utterance")
        self.dataset = dataset
        self.batch_size = batch_size
        self.segment_frames = segment_frames
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.position = 0
        self.order = torch.randperm(len(dataset), generator=self.generator)

    def next_batch(self) -> Batch:
        if self.position + self.batch_size > len(self.order):
            self.epoch += 1
            self.position = 0
            self.order = torch.randperm(len(self.dataset), generator=self.generator)
        picked = self.order[self.position : self.position + self.batch_size].tolist()
        self.position += self.batch_size
        tokens, mels = [], []
        for i in picked:
            start = _randint(self.generator, 0, self.dataset.lengths[i] - self.segment_frames + 1)
            stop = start + self.segment_frames
            tokens.append(self.dataset.tokens[i][start:stop])
            mels.append(self.dataset.mels[i][:, start:stop])
        return Batch(tokens=torch.stack(tokens), mels=torch.stack(mels), speakers=self.dataset.speakers[picked])

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "order": self.order.clone(),
            "generator": self.generator.get_state(),
            "size": len(self.dataset),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Raises ValueError if the snapshot was taken over a different dataset or batch size."""
        if (state["size"], state["batch_size"]) != (len(self.dataset), self.batch_size):
            raise ValueError(
                f"data position was saved for {state['size']} utterances in batches of "
                f"{state['batch_size']}, not {len(self.dataset)} in batches of {self.batch_size}"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.order = state["order"].clone()
        self.generator.set_state(state["generator"].clone())


# --------------------------------------------------------------------------
# The two modules


class SemanticGPT(nn.Module):
    """The 'GPT' stage: a causal transformer predicting the next semantic token."""

    def __init__(self, vocab: int, speakers: int, d_model: int, dropout: float, max_len: int = 512) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, d_model)
        self.speaker = nn.Embedding(speakers, d_model)
        self.position = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=2 * d_model, dropout=dropout, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor, speakers: Tensor) -> Tensor:
        """(B, T) tokens, (B,) speakers -> (B, T, vocab) logits for the token after each position."""
        length = tokens.shape[1]
        x = self.token(tokens) + self.position(torch.arange(length)) + self.speaker(speakers)[:, None]
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


class AcousticSoVITS(nn.Module):
    """The 'SoVITS' stage in miniature: semantic tokens + speaker -> log-mel frames."""

    def __init__(self, vocab: int, speakers: int, n_mels: int, channels: int, dropout: float) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, channels)
        self.speaker = nn.Embedding(speakers, channels)
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, 5, padding=2) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Conv1d(channels, n_mels, 1)

    def forward(self, tokens: Tensor, speakers: Tensor) -> Tensor:
        """(B, T) tokens, (B,) speakers -> (B, n_mels, T)."""
        x = (self.token(tokens) + self.speaker(speakers)[:, None]).transpose(1, 2)
        for conv in self.convs:
            x = x + self.dropout(F.gelu(conv(x)))
        return self.out(x)


# --------------------------------------------------------------------------
# Training


class WarmupThenDecay:
    """LR factor: linear warmup, then exponential decay with the given half-life.

    A callable object rather than a lambda so that ``LambdaLR.state_dict()``
    records its settings.
    """

    def __init__(self, warmup_steps: int, half_life_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.half_life_steps = half_life_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return 0.5 ** ((step - self.warmup_steps) / self.half_life_steps)


@dataclass
class Workload:
    cfg: VoiceConfig
    dataset: VoiceDataset
    gpt: SemanticGPT
    sovits: AcousticSoVITS
    optimizer: torch.optim.Adam
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: ResumableBatches


@dataclass(frozen=True)
class Losses:
    gpt: float
    sovits: float

    @property
    def total(self) -> float:
        return self.gpt + self.sovits


def build_gpt(cfg: VoiceConfig) -> SemanticGPT:
    return SemanticGPT(cfg.vocab, cfg.speakers, cfg.d_model, cfg.dropout)


def build_sovits(cfg: VoiceConfig) -> AcousticSoVITS:
    return AcousticSoVITS(cfg.vocab, cfg.speakers, cfg.n_mels, channels=cfg.d_model, dropout=cfg.dropout)


def build_workload(cfg: VoiceConfig) -> Workload:
    """Data, modules, optimizer, scheduler and batches, all determined by ``cfg.seed``.

    Seeds torch's global generator (parameter init and dropout draw from it),
    and python's and numpy's too: nothing here draws from them, but the
    Checkpointer captures every stream, and an unseeded one would make two
    runs' RNG state differ (``runner drill`` compares it).
    """
    dataset = build_dataset(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    gpt, sovits = build_gpt(cfg), build_sovits(cfg)
    optimizer = torch.optim.Adam(
        [{"params": gpt.parameters()}, {"params": sovits.parameters()}], lr=cfg.lr, betas=(0.9, 0.98)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupThenDecay(cfg.warmup_steps, cfg.half_life_steps))
    # A distinct seed: the data order must not mirror the init draws.
    batches = ResumableBatches(dataset, cfg.batch_size, cfg.segment_frames, seed=cfg.seed + 1)
    return Workload(cfg, dataset, gpt, sovits, optimizer, scheduler, batches)


def train_step(w: Workload) -> Losses:
    w.gpt.train()
    w.sovits.train()
    batch = w.batches.next_batch()
    logits = w.gpt(batch.tokens[:, :-1], batch.speakers)
    gpt_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.tokens[:, 1:].reshape(-1))
    # Teacher-forced on the true tokens, as SoVITS trains on extracted ones.
    sovits_loss = F.l1_loss(w.sovits(batch.tokens, batch.speakers), batch.mels)
    w.optimizer.zero_grad(set_to_none=True)
    (gpt_loss + sovits_loss).backward()
    nn.utils.clip_grad_norm_([*w.gpt.parameters(), *w.sovits.parameters()], max_norm=1.0)
    w.optimizer.step()
    w.scheduler.step()
    return Losses(gpt=gpt_loss.item(), sovits=sovits_loss.item())


# --------------------------------------------------------------------------
# Fingerprint of the final state


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def fingerprint(w: Workload, step: int, loss: float | None) -> dict:
    """sha256 over every parameter and every optimizer state tensor, in a fixed order.

    Names and keys are hashed along with the raw bytes so a reordering shows up;
    the optimizer hash also covers the param groups' hyperparameters (the LR).
    """
    params = hashlib.sha256()
    for prefix, module in (("gpt", w.gpt), ("sovits", w.sovits)):
        for name, p in module.named_parameters():
            params.update(f"{prefix}.{name}".encode())
            params.update(_tensor_bytes(p))
    opt = hashlib.sha256()
    state = w.optimizer.state_dict()
    for index in sorted(state["state"]):
        for key in sorted(state["state"][index]):
            value = state["state"][index][key]
            opt.update(f"{index}.{key}".encode())
            opt.update(_tensor_bytes(value) if isinstance(value, Tensor) else repr(value).encode())
    for group in state["param_groups"]:
        opt.update(repr(sorted((k, v) for k, v in group.items() if k != "params")).encode())
    return {"step": step, "params_sha256": params.hexdigest(), "optimizer_sha256": opt.hexdigest(), "loss": loss}


def write_fingerprint(path: str, fp: dict) -> None:
    Path(path).write_text(json.dumps(fp, indent=2) + "\n")


# --------------------------------------------------------------------------
# The loop and the command line


class _Progress:
    """Prints one compact line every ``every`` steps: mean losses since the last line, LR, speed."""

    def __init__(self, total: int, every: int, first_step: int) -> None:
        self.total, self.every = total, every
        self._since, self._since_step = time.perf_counter(), first_step
        self._gpt = self._sovits = 0.0

    def update(self, step: int, epoch: int, losses: Losses, lr: float) -> None:
        self._gpt += losses.gpt
        self._sovits += losses.sovits
        if self.every <= 0 or (step % self.every and step != self.total):
            return
        now, steps = time.perf_counter(), step - self._since_step
        gpt, sovits = self._gpt / steps, self._sovits / steps
        print(
            f"step {step}/{self.total} epoch {epoch} loss {gpt + sovits:.4f} "
            f"(gpt {gpt:.4f} sovits {sovits:.4f}) lr {lr:.2e} {steps / max(now - self._since, 1e-9):.1f} steps/s",
            flush=True,
        )
        self._since, self._since_step = now, step
        self._gpt = self._sovits = 0.0


def _checkpointer(args: argparse.Namespace, w: Workload, extra: dict) -> runner.Checkpointer:
    """Settings from RUNNER_* (what `runner start` passes), overridden by the flags given."""
    overrides = {
        "bucket": args.bucket,
        "run_id": args.run_id,
        # The flag, else what `runner start` passes (RUNNER_SAVE_EVERY_STEPS), else "auto": the
        # Checkpointer measures what a save costs and picks the interval (Young/Daly).
        "save_every_steps": args.save_every_steps or os.environ.get("RUNNER_SAVE_EVERY_STEPS") or "auto",
        "keep_last": args.keep_last,
    }
    return runner.Checkpointer.from_env(
        gpt=w.gpt,
        sovits=w.sovits,
        optimizer=w.optimizer,
        scheduler=w.scheduler,
        data=w.batches,
        extra=extra,
        **{k: v for k, v in overrides.items() if v is not None},
    )


class _Preempted(Exception):
    """The Checkpointer asked the run to stop; its emergency snapshot is committed."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


def _train(args: argparse.Namespace, w: Workload, ckpt: runner.Checkpointer | None, step: int, extra: dict) -> int:
    """Steps until ``args.steps`` or a preemption request; returns the step reached.

    Raises _Preempted when the Checkpointer asks the run to stop (its snapshot
    is committed by then).
    """
    progress = _Progress(args.steps, args.log_every, step)
    while step < args.steps:
        losses = train_step(w)
        step += 1
        extra["loss"] = losses.total
        progress.update(step, w.batches.epoch, losses, w.scheduler.get_last_lr()[0])
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if ckpt and ckpt.step(step, epoch=w.batches.epoch, metrics={"loss": losses.total}):
            raise _Preempted(step)
    if ckpt:
        ckpt.save(step, epoch=w.batches.epoch, metrics={"loss": extra["loss"]}, final=True)
    return step


def run(args: argparse.Namespace) -> int:
    """Train, resume, or just report a finished run; returns the process exit code.

    Raises what ``runner.Checkpointer`` raises (see ``main`` for how they are shown).
    """
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    w = build_workload(VoiceConfig(seed=args.seed))
    extra: dict = {"seed": args.seed, "loss": None}  # restore() replaces it with the snapshot's
    ckpt = None if args.no_checkpoint else _checkpointer(args, w, extra)
    try:
        step = ckpt.restore() if ckpt else 0
        if extra["seed"] != args.seed:
            print(f"voice: run {args.run_id!r} was started with --seed {extra['seed']}; "
                  "pass that seed or use a new --run-id", file=sys.stderr)  # fmt: skip
            return 2
        if ckpt and ckpt.finished:
            print(f"voice: run {args.run_id!r} already finished at step {step}; nothing to do", flush=True)
        else:
            print(f"voice: {f'resuming at step {step}' if step else 'fresh run'}, {args.steps} steps", flush=True)
            started = time.perf_counter()
            step = _train(args, w, ckpt, step, extra)
            print(f"voice: finished {step} steps in {time.perf_counter() - started:.1f} s", flush=True)
    except _Preempted as stop:
        # The supervisor decides the exit code; ours only says "no error".
        print(f"voice: preemption requested; snapshot at step {stop.step} committed, stopping", flush=True)
        return 0
    finally:
        if ckpt:
            ckpt.close()
    if args.fingerprint_out:
        write_fingerprint(args.fingerprint_out, fingerprint(w, step, extra["loss"]))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="python -m runner.examples.voice",
        description="Train a tiny GPT-SoVITS-shaped voice model on synthetic audio, checkpointed by runner.",
    )
    p.add_argument("--bucket", default=env.get("RUNNER_BUCKET", "./runner-bucket"),
                   help="local path or fsspec URL (env RUNNER_BUCKET; default ./runner-bucket)")
    p.add_argument("--run-id", default=env.get("RUNNER_RUN_ID", "voice-demo"),
                   help="run id inside the bucket (env RUNNER_RUN_ID; default voice-demo)")
    p.add_argument("--steps", type=int, default=2500, help="total optimizer steps (default 2500: about a minute)")
    p.add_argument("--save-every-steps", default=None, metavar="N|auto",
                   help="periodic save interval in steps, or auto (default: env RUNNER_SAVE_EVERY_STEPS, else auto)")
    p.add_argument("--keep-last", type=int, default=None,
                   help="snapshots to keep (default: env RUNNER_KEEP_LAST or the Checkpointer's)")
    p.add_argument("--seed", type=int, default=0)
    # One thread by default: this model is too small to gain much from more,
    # and it leaves a core to the supervisor and the background writer.
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; a resume is exact only with the same value (default 1)")
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step (for notice tests)")
    p.add_argument("--fingerprint-out", metavar="PATH",
                   help="write JSON {step, params_sha256, optimizer_sha256, loss} of the final state")
    p.add_argument("--no-checkpoint", action="store_true", help="train without the Checkpointer")
    p.add_argument("--log-every", type=int, default=100, help="progress line every N steps (0: never)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """The command line; errors a user can cause are one line on stderr, not a traceback."""
    args = parse_args(argv)
    try:
        return run(args)
    except ConfigError as exc:
        print(f"voice: {exc}", file=sys.stderr)
        return 2
    except (StorageError, SnapshotNotFoundError, StateMismatchError) as exc:
        print(f"voice: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
