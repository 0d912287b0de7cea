"""The speech stage grounds what it hears: a fresh speech adapter on a frozen random tiny LM and a frozen random tiny
Conformer, trained on the transcripts of the embedded spoken data (prompt, <|audio|> placeholders, transcript, ".",
stop; the loss on the target only), names the colour that opens held-out utterances ("red", "red circle") far above
chance (a forced choice among the six colours by loss). The same steps with every clip replaced by silence of its
length stay near chance, so it is the sound that is read (measured 2026-12-06 on the 77 held-out utterances that
open with a colour, LM and init seeds 0, 1, 2: 0.96, 0.99, 1.00 with the audio; 0.23, 0.16, 0.19 silent; 19-21 s
per pair of runs on one thread, beside 11-23 s to speak the 600 utterances).

Why the opening word: the adapter's outputs replace the placeholders' embeddings, so the residual stream of the last
placeholder, which predicts the first word, is the adapter's own; a later word is predicted from a text position
that sees the audio only through the frozen random LM's attention, whose random value and output projections (std
0.02) add a few percent to a text token's embedding (std 1). A learned embedding of the true colour written on every
placeholder (an oracle, one scratch run) was chosen right for 1.00 of the utterances that open with it but 0.62 of
all that hold one; this test asks for what a speech stage can reach on a random LM. The learning rate of the vision
test (1e-2) left seed 2 at 0.75 in these steps, and batches of 16 left it at 0.77-0.87 in 200-300 steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import WordVocab, tiny_model

from adapters.speech import (
    SpeechAdapter,
    SpeechAdapterConfig,
    num_audio_tokens,
    scatter_audio_embeddings,
    waveforms_to_features,
)
from data.scenes import COLOURS
from encoders.speech import SpeechEncoder, SpeechEncoderConfig
from llama3mm import Llama3MM
from llama3mm.model import MediaState

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS, BATCH, LR = 200, 32, 3e-3


@pytest.fixture(scope="module")
def utterances(tmp_path_factory) -> dict[str, list[dict]]:
    from data.media import MediaSamples
    from data.synthetic import generate

    root = tmp_path_factory.mktemp("speech")
    generate("speech", root, train=400, heldout=200)
    return {
        split: list(MediaSamples(root, kind="audio", split=split, shuffle=False, epochs=1))
        for split in ("train", "heldout")
    }


def audio_of(samples: list[dict], silent: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded waveforms [B, L] and sample counts [B] (every clip all zeros when ``silent``, its length kept)."""
    lengths = torch.tensor([len(s["audio"]) for s in samples])
    audio = torch.nn.utils.rnn.pad_sequence([s["audio"] for s in samples], batch_first=True)
    return (torch.zeros_like(audio) if silent else audio), lengths


def rows(mm: Llama3MM, vocab: WordVocab, texts: list[str], lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, S] (prompt, each clip's placeholders, transcript, ".", stop; right-padded) and labels [B, S]
    scoring the transcript, its "." and the stop, as train/adapter.py's speech rows do."""
    counts = [num_audio_tokens(int(n)) for n in lengths]
    seqs = [
        [0] + [mm.audio_token_id] * n + [vocab.ids[w] for w in f"{t} .".split()] + [1]
        for t, n in zip(texts, counts, strict=True)
    ]
    width = max(map(len, seqs))
    tokens, labels = torch.ones(len(seqs), width, dtype=torch.long), torch.full((len(seqs), width), -100)
    for b, (seq, n) in enumerate(zip(seqs, counts, strict=True)):
        tokens[b, : len(seq)] = torch.tensor(seq)
        # Position t predicts token t + 1: the last placeholder (position n) predicts the first word.
        labels[b, n : len(seq) - 1] = torch.tensor(seq[n + 1 :])
    return tokens, labels


def placed(mm: Llama3MM, embeddings: torch.Tensor, counts: torch.Tensor) -> MediaState:
    """The media state that puts the adapter's outputs [B, N, dim] on each row's placeholders (as the model does)."""
    return MediaState(
        embed=lambda tokens, h: scatter_audio_embeddings(h, tokens, mm.audio_token_id, embeddings, counts)
    )


def summed_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed loss [B] of each row's scored tokens."""
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(1)


def train_speech_stage(utterances: dict[str, list[dict]], silent: bool, seed: int = 0) -> float:
    """Train a fresh speech adapter for STEPS steps; its held-out forced-choice accuracy on the opening colour."""
    torch.manual_seed(seed)
    lm = tiny_model(seed, n_layers=2)
    encoder = SpeechEncoder(SpeechEncoderConfig.from_preset("tiny"))
    adapter_cfg = SpeechAdapterConfig(encoder_dim=encoder.cfg.dim, lm_dim=lm.config.dim, dim=64, heads=4, ffn_dim=128)
    mm = Llama3MM(lm, speech_encoder=encoder, speech_adapter=SpeechAdapter(adapter_cfg))
    mm.requires_grad_(False)
    adapter = mm.speech_adapter.requires_grad_(True)
    train = utterances["train"]
    heldout = [s for s in utterances["heldout"] if s["text"].split()[0] in COLOURS]
    vocab = WordVocab([s["text"] for s in train + heldout] + list(COLOURS) + ["."])
    audio, lengths = audio_of(train, silent)
    with torch.no_grad():
        # The encoder is frozen: its states are computed once, and each step runs only the adapter and the LM.
        hidden, steps = encoder(*waveforms_to_features(audio, lengths))
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        idx = torch.randperm(len(train), generator=generator)[:BATCH]
        embeddings, counts = adapter(hidden[idx, : int(steps[idx].max())], steps[idx])
        tokens, labels = rows(mm, vocab, [train[i]["text"] for i in idx], lengths[idx])
        loss = summed_losses(mm.forward_with_media(tokens, placed(mm, embeddings, counts)), labels).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        optimizer.step()
    mm.eval()
    audio, lengths = audio_of(heldout, silent)
    with torch.no_grad():
        losses = []
        for colour in COLOURS:
            tokens, labels = rows(mm, vocab, [" ".join([colour, *s["text"].split()[1:]]) for s in heldout], lengths)
            # The model's own audio path (features, encoder, adapter, placeholders), as generation takes it.
            losses.append(summed_losses(mm(tokens, audio=audio, audio_lengths=lengths), labels))
    picked = torch.stack(losses, 1).argmin(1)
    truth = [s["text"].split()[0] for s in heldout]
    return sum(COLOURS[int(k)] == colour for k, colour in zip(picked, truth, strict=True)) / len(heldout)


def test_speech_stage_names_the_colour_it_hears(utterances):
    heard, silent = train_speech_stage(utterances, silent=False), train_speech_stage(utterances, silent=True)
    # Chance is 1/6; silence of the clip's length leaves only the colour prior and what the duration tells.
    assert heard >= 0.8 and silent <= 0.35, (heard, silent)
