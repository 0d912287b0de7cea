"""The speech adapter: token counts, padded batches, the placeholder scatter, and gradients into adapter + encoder."""

import pytest
import torch
from conftest import tiny_model

from adapters.speech import (
    SpeechAdapter,
    SpeechAdapterConfig,
    encode_audio,
    expand_audio_placeholders,
    num_audio_tokens,
    scatter_audio_embeddings,
)
from encoders.speech import SpeechEncoder, SpeechEncoderConfig
from llama3mm import Llama3MM

LM_DIM = 64
AUDIO_ID = 500


@pytest.fixture(scope="module")
def speech():
    """A tiny speech encoder and adapter (random weights) in eval mode."""
    torch.manual_seed(0)
    encoder = SpeechEncoder(SpeechEncoderConfig.from_preset("tiny")).eval()
    adapter = SpeechAdapter(SpeechAdapterConfig(encoder_dim=64, lm_dim=LM_DIM, dim=48, heads=4, ffn_dim=96)).eval()
    return encoder, adapter


def _clips(*lengths: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    audio = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        audio[i, :n] = 0.1 * torch.randn(n, generator=g)
    return audio, torch.tensor(lengths)


def test_num_audio_tokens_is_what_the_adapter_emits(speech):
    """80 ms per token: 1 s of audio gives 13 tokens (101 frames -> 26 steps -> 13); every length matches the model."""
    encoder, adapter = speech
    assert num_audio_tokens(16000) == 13
    assert num_audio_tokens(201) == 1
    for n in (201, 639, 640, 1280, 1281, 4321, 16000):
        embeds, counts = encode_audio(encoder, adapter, *_clips(n))
        assert counts.tolist() == [num_audio_tokens(n)], n
        assert embeds.shape == (1, num_audio_tokens(n), LM_DIM)
    with pytest.raises(ValueError, match="num_samples=200"):
        num_audio_tokens(200)
    with pytest.raises(ValueError, match="audio_lengths \\[100\\]"):
        encode_audio(encoder, adapter, *_clips(100))


def test_padded_batch_equals_each_clip_alone(speech):
    """Three clips of different lengths in one padded batch give each clip's embeddings alone; padding is zero."""
    encoder, adapter = speech
    lengths = (3200, 1111, 5600)
    audio, audio_lengths = _clips(*lengths)
    with torch.no_grad():
        batched, counts = encode_audio(encoder, adapter, audio, audio_lengths)
        for i, n in enumerate(lengths):
            alone, _ = encode_audio(encoder, adapter, audio[i : i + 1, :n])
            torch.testing.assert_close(batched[i, : counts[i]], alone[0], atol=1e-5, rtol=1e-5)
            assert not batched[i, counts[i] :].any()


def test_scatter_replaces_exactly_the_placeholders():
    """Clip k's outputs land on the k-th run of placeholders, in order; every other embedding is untouched."""
    torch.manual_seed(0)
    tokens = torch.tensor(
        [
            [1, AUDIO_ID, AUDIO_ID, AUDIO_ID, 7, AUDIO_ID, AUDIO_ID, 9],
            [3, 4, 5, 6, AUDIO_ID, AUDIO_ID, AUDIO_ID, AUDIO_ID],
        ]
    )
    lengths = torch.tensor([3, 2, 4])
    embeddings = torch.randn(2, 8, LM_DIM)
    audio = torch.randn(3, 5, LM_DIM)
    out = scatter_audio_embeddings(embeddings, tokens, AUDIO_ID, audio, lengths)
    torch.testing.assert_close(out[0, 1:4], audio[0, :3], rtol=0, atol=0)
    torch.testing.assert_close(out[0, 5:7], audio[1, :2], rtol=0, atol=0)
    torch.testing.assert_close(out[1, 4:8], audio[2, :4], rtol=0, atol=0)
    placeholder = tokens == AUDIO_ID
    torch.testing.assert_close(out[~placeholder], embeddings[~placeholder], rtol=0, atol=0)
    assert not torch.equal(out[placeholder], embeddings[placeholder])


def test_scatter_rejects_placeholders_that_disagree_with_the_clips():
    """Too few placeholders, or a clip's run broken by another token, are errors that say what is wrong."""
    embeddings, audio = torch.zeros(1, 6, 4), torch.ones(1, 3, 4)
    with pytest.raises(ValueError, match="hold 2 <\\|audio\\|> placeholders.*need 3"):
        scatter_audio_embeddings(
            embeddings, torch.tensor([[AUDIO_ID, AUDIO_ID, 1, 2, 3, 4]]), AUDIO_ID, audio, torch.tensor([3])
        )
    with pytest.raises(ValueError, match="clip 0 is split"):
        tokens = torch.tensor([[AUDIO_ID, AUDIO_ID, 1, AUDIO_ID, 3, 4]])
        scatter_audio_embeddings(embeddings, tokens, AUDIO_ID, audio, torch.tensor([3]))


def test_expand_audio_placeholders():
    """One placeholder per clip in a prompt becomes a run of that clip's token count."""
    assert expand_audio_placeholders([1, AUDIO_ID, 2, AUDIO_ID], AUDIO_ID, [3, 1]) == [1, *[AUDIO_ID] * 3, 2, AUDIO_ID]
    with pytest.raises(ValueError, match="holds 1 <\\|audio\\|> placeholders .* for 2 clips"):
        expand_audio_placeholders([1, AUDIO_ID], AUDIO_ID, [3, 1])


@pytest.fixture(scope="module")
def speech_mm(speech) -> Llama3MM:
    """A tiny frozen LM (vocab 512) with the tiny speech encoder and adapter."""
    encoder, adapter = speech
    return Llama3MM(tiny_model(), speech_encoder=encoder, speech_adapter=adapter).eval()


def test_llama3mm_reads_speech_as_token_embeddings(speech_mm):
    """Markers expand to num_audio_tokens placeholders; a padded batch equals each row alone; text before the
    clip is the frozen LM's, text after it hears the clip."""
    mm, audio_id = speech_mm, speech_mm.audio_token_id
    assert audio_id == mm.lm.config.vocab_size + 1  # an extra id: the LM can never emit a placeholder
    rows = [[1, audio_id, 5, 6], [1, 7, 8, audio_id, 9]]
    audio, lengths = _clips(1600, 4000)
    batch = mm.processor(rows, audio=audio, audio_lengths=lengths, pad_id=0)
    counts = [num_audio_tokens(1600), num_audio_tokens(4000)]
    assert (batch["tokens"] == audio_id).sum(1).tolist() == counts
    assert batch["lengths"].tolist() == [3 + counts[0], 4 + counts[1]]
    with torch.no_grad():
        logits = mm(batch["tokens"], audio=batch["audio"], audio_lengths=batch["audio_lengths"])
        for b in range(len(rows)):
            n = int(batch["lengths"][b])
            alone = mm(batch["tokens"][b : b + 1, :n], audio=[audio[b, : lengths[b]]])
            torch.testing.assert_close(logits[b : b + 1, :n], alone, atol=1e-5, rtol=1e-5)
        plain = mm.lm(batch["tokens"].clamp(max=511))
    first = batch["tokens"][1].tolist().index(audio_id)
    torch.testing.assert_close(logits[1, :first], plain[1, :first], rtol=0, atol=0)
    assert not torch.allclose(logits[1, first:], plain[1, first:], atol=1e-3)


def test_gradients_reach_adapter_and_speech_encoder_not_the_lm(speech_mm):
    """Training the speech stage: every adapter and encoder parameter gets a gradient; the frozen LM gets none."""
    mm = speech_mm
    mm.zero_grad(set_to_none=True)
    batch = mm.processor([[1, mm.audio_token_id, 5]], audio=[_clips(2400)[0][0]], pad_id=0)
    mm(batch["tokens"], audio=batch["audio"], audio_lengths=batch["audio_lengths"]).logsumexp(-1).mean().backward()
    for name, param in [*mm.speech_adapter.named_parameters(), *mm.speech_encoder.named_parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in mm.lm.parameters()) and all(not p.requires_grad for p in mm.lm.parameters())
    mm.zero_grad(set_to_none=True)


def test_generate_with_audio_replaces_placeholders_once(speech_mm):
    """Greedy decoding with a clip (the placeholders replaced in the prefill only) equals full forwards."""
    mm = speech_mm
    wave = _clips(3000, seed=3)[0][0]
    prompt = [1, mm.audio_token_id, 11, 12]
    new = list(mm.generate_tokens(prompt, audio=wave, max_new_tokens=4, temperature=0.0, stop_tokens=[]))
    assert len(new) == 4
    tokens = mm.processor([prompt + new[:-1]], audio=[wave], pad_id=0)["tokens"]
    with torch.no_grad():
        logits = mm(tokens, audio=[wave])[0]
    start = tokens.shape[1] - len(new)
    assert logits[start:].argmax(-1).tolist() == new


def test_prompts_place_one_run_per_clip(speech_mm, tmp_path):
    """Chat audio items, "<|audio|>" text markers and marker-less prompts all get a run of num_audio_tokens
    placeholders per clip; a WAV file reads as its waveform (encoders.speech.load_audio)."""
    import soundfile

    mm, audio_id = speech_mm, speech_mm.audio_token_id
    wave = _clips(4000, seed=5)[0][0]
    path = tmp_path / "clip.wav"
    soundfile.write(path, wave.numpy(), 16000, subtype="FLOAT")
    run = num_audio_tokens(4000)
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe."}]}]
    chat = mm.processor.prompt_inputs(messages, audio=str(path))
    torch.testing.assert_close(chat["audio"][0], wave)
    ids = chat["tokens"][0].tolist()
    assert ids.count(audio_id) == run and ids.index(audio_id) + run == len(ids) - ids[::-1].index(audio_id)
    assert mm.tokenizer.audio_id not in ids
    marked = mm.processor.prompt_inputs("Say <|audio|> and <|audio|>", audio=[wave, wave[:1000]])["tokens"][0]
    assert (marked == audio_id).sum() == run + num_audio_tokens(1000)
    bare = mm.processor.prompt_inputs("Transcribe.", audio=wave)["tokens"][0].tolist()
    assert bare[0] == mm.tokenizer.bos_id and bare[1 : 1 + run] == [audio_id] * run
    with pytest.raises(ValueError, match="holds 1 <\\|audio\\|> tokens but 2 audio clips"):
        mm.processor.prompt_inputs("Say <|audio|>", audio=[wave, wave])


def test_speech_parts_survive_save_and_load(speech_mm, tmp_path):
    """save_pretrained / from_pretrained keep the speech encoder and adapter: the same logits from the same clip."""
    mm = speech_mm
    batch = mm.processor([[1, mm.audio_token_id, 5]], audio=[_clips(2000, seed=7)[0][0]], pad_id=0)
    mm.save_pretrained(tmp_path / "mm")
    loaded = Llama3MM.from_pretrained(tmp_path / "mm", device="cpu").eval()
    assert isinstance(loaded.speech_adapter, SpeechAdapter) and loaded.speech_adapter.cfg == mm.speech_adapter.cfg
    with torch.no_grad():
        inputs = dict(audio=batch["audio"], audio_lengths=batch["audio_lengths"])
        torch.testing.assert_close(loaded(batch["tokens"], **inputs), mm(batch["tokens"], **inputs), rtol=0, atol=0)


def test_mismatched_speech_parts_are_refused(speech):
    """An adapter sized for another LM or another encoder is an error naming both widths."""
    encoder, _ = speech
    wide = SpeechAdapter(SpeechAdapterConfig(encoder_dim=64, lm_dim=128, dim=48, heads=4, ffn_dim=96))
    with pytest.raises(ValueError, match="speech adapter lm_dim 128 != LM width 64"):
        Llama3MM(tiny_model(), speech_encoder=encoder, speech_adapter=wide)
    other = SpeechAdapter(SpeechAdapterConfig(encoder_dim=32, lm_dim=LM_DIM, dim=48, heads=4, ffn_dim=96))
    with pytest.raises(ValueError, match="encoder_dim 32 != speech encoder dim 64"):
        Llama3MM(tiny_model(), speech_encoder=encoder, speech_adapter=other)
