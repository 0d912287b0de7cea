"""Generation is proven against HF transformers' LlamaForCausalLM.generate on the same random weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_config

from lm.checkpoint import save_pretrained
from lm.generate import IncrementalDecoder, draw_index, generate, main, stream_generate
from lm.model import Transformer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512
NEW = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(ours, HF) on the same random weights, converted through save_pretrained's HF layout."""
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    model.init_weights()
    with torch.no_grad():
        # The default init's tiny residual branches make greedy decoding fall into short loops at once;
        # larger layer weights give outputs that depend on the whole context.
        for name, param in model.named_parameters():
            if name.startswith("layers.") and param.dim() == 2:
                param.mul_(10)
    model.eval()
    path = tmp_path_factory.mktemp("tiny_hf")
    save_pretrained(model, path, format="hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, hf


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_greedy(hf, prompt: list[int], n: int = NEW) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def _greedy(model, prompt, n: int = NEW, **kwargs):
    return generate(model, None, prompt, max_new_tokens=n, temperature=0, **kwargs)


def test_greedy_matches_hf(models):
    model, hf = models
    prompt = _prompt(11, seed=1)
    ours = _greedy(model, prompt)
    assert len(set(ours)) > NEW // 2, f"degenerate test weights: {ours}"
    assert ours == _hf_greedy(hf, prompt)


def test_batch_left_padding_matches_hf_per_prompt(models):
    model, hf = models
    prompts = [_prompt(n, seed=10 + n) for n in (3, 17, 9, 17)]
    ours = _greedy(model, prompts)
    assert ours == [_hf_greedy(hf, p) for p in prompts]


def test_batch_rows_stop_independently(models):
    model, _ = models
    prompts = [_prompt(n, seed=20 + n) for n in (5, 12, 8)]
    full = _greedy(model, prompts)
    stop = full[0][4]
    ours = _greedy(model, prompts, stop_tokens={stop})
    expected = [row[: row.index(stop)] if stop in row else row for row in full]
    assert ours == expected
    assert len(ours[0]) <= 4


def test_stream_yields_the_same_ids(models):
    model, _ = models
    prompt = _prompt(6, seed=2)
    assert list(stream_generate(model, None, prompt, max_new_tokens=NEW, temperature=0)) == _greedy(model, prompt)
    sampled = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=3)
    assert list(stream_generate(model, None, prompt, **sampled)) == generate(model, None, prompt, **sampled)


def test_stop_token_ends_generation(models):
    model, _ = models
    prompt = _prompt(8, seed=4)
    full = _greedy(model, prompt)
    # The first step >= 5 whose token is new, so that the stop fires exactly there.
    step = next(i for i in range(5, NEW) if full[i] not in full[:i])
    out = _greedy(model, prompt, stop_tokens={full[step]})
    assert out == full[:step]  # the stop token itself is not returned
    assert list(stream_generate(model, None, prompt, temperature=0, stop_tokens={full[step]})) == full[:step]


class _FakeTokenizer:
    """Just what generate reads from a tokenizer: encode and the default stop tokens."""

    def __init__(self, stop_tokens):
        self.stop_tokens = frozenset(stop_tokens)

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        assert bos and not eos
        return [1, *(ord(c) % VOCAB for c in text)]


def test_text_prompts_and_default_stop_tokens_come_from_the_tokenizer(models):
    model, _ = models
    full = _greedy(model, [1, *(ord(c) for c in "hello")])
    step = next(i for i in range(3, NEW) if full[i] not in full[:i])
    tokenizer = _FakeTokenizer({full[step]})
    assert generate(model, tokenizer, "hello", max_new_tokens=NEW, temperature=0) == full[:step]
    assert generate(model, tokenizer, ["hello", "hi"], max_new_tokens=NEW, temperature=0)[0] == full[:step]
    assert generate(model, tokenizer, "hello", max_new_tokens=NEW, temperature=0, stop_tokens=()) == full


def test_stops_at_max_seq_len(models):
    model, hf = models
    prompt = _prompt(model.config.max_seq_len - 6, seed=5)
    out = _greedy(model, prompt, n=50)
    assert len(out) == 6
    assert out == _hf_greedy(hf, prompt, n=6)
    with pytest.raises(ValueError, match="max_seq_len"):
        _greedy(model, _prompt(model.config.max_seq_len, seed=6))


def test_echo_and_prompt_forms(models):
    model, _ = models
    prompt = _prompt(5, seed=7)
    new = _greedy(model, prompt, n=4)
    assert _greedy(model, prompt, n=4, echo=True) == prompt + new
    assert _greedy(model, torch.tensor(prompt), n=4) == new
    assert _greedy(model, [prompt], n=4) == [new]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(models):
    model, _ = models
    prompt = _prompt(7, seed=8)
    kwargs = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.95)
    first = generate(model, None, prompt, seed=123, **kwargs)
    assert generate(model, None, prompt, seed=123, **kwargs) == first
    assert generate(model, None, prompt, seed=124, **kwargs) != first
    greedy = _greedy(model, prompt)
    assert generate(model, None, prompt, max_new_tokens=NEW, temperature=1.0, top_k=1, seed=0) == greedy
    # A vanishing nucleus keeps only the most likely token.
    assert generate(model, None, prompt, max_new_tokens=NEW, temperature=1.0, top_p=1e-9, seed=0) == greedy


def test_top_k_and_top_p_restrict_the_candidates(models):
    model, _ = models
    prompt = _prompt(9, seed=9)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]))[0, -1]
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    # The nucleus: the smallest prefix of the sorted distribution whose mass reaches top_p.
    top_p = 0.5
    cumulative = probs[order].cumsum(0)
    nucleus = set(order[: int((cumulative < top_p).sum()) + 1])
    seen_k, seen_p = set(), set()
    for seed in range(40):
        seen_k.update(generate(model, None, prompt, max_new_tokens=1, temperature=1.0, top_k=3, top_p=None, seed=seed))
        seen_p.update(generate(model, None, prompt, max_new_tokens=1, temperature=1.0, top_p=top_p, seed=seed))
    assert seen_k <= set(order[:3]) and len(seen_k) > 1
    assert seen_p <= nucleus


def test_a_broad_row_does_not_change_the_narrow_rows_beside_it():
    """Per-row generators (row_seeds) and the nucleus search grown only for the rows that need it: in a batch of a
    peaked and a near-flat next-token distribution, each row draws what it draws alone, within its own nucleus."""
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    model.init_weights()
    with torch.no_grad():
        # No residual branches: the logits depend on the last token only. Token 1 puts nearly all the mass on
        # token 5; token 2 spreads it over the whole vocabulary (a nucleus of over 256 tokens).
        for name, param in model.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                param.zero_()
        model.tok_embeddings.weight[1:3] = torch.eye(2, model.config.dim)
        model.output.weight.zero_()
        model.output.weight[5, 0] = 2.0
        model.output.weight[:, 1] = 0.01 * torch.randn(VOCAB)
    rows, seeds, top_p = [[1], [2], [1], [2]], (11, 12, 13, 14), 0.9
    batch = generate(model, None, rows, max_new_tokens=1, temperature=1.0, top_p=top_p, row_seeds=seeds)
    alone = [generate(model, None, [r], max_new_tokens=1, temperature=1.0, top_p=top_p, row_seeds=(s,))[0]
             for r, s in zip(rows, seeds, strict=True)]  # fmt: skip
    assert batch == alone
    assert batch[0] == batch[2] == [5] and len({batch[1][0], batch[3][0]}) == 2
    with torch.inference_mode():
        probs = model(torch.tensor([[2]]))[0, -1].softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = order[: int((probs[order].cumsum(0) < top_p).sum()) + 1].tolist()
    assert len(nucleus) > 256 and {batch[1][0], batch[3][0]} <= set(nucleus)


def test_draw_follows_the_weights():
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 6.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 2.0]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([draw_index(weights, generator) for _ in range(4000)])
    assert (draws[:, 1] == 5).all()
    freq = torch.bincount(draws[:, 0], minlength=6).float() / len(draws)
    assert torch.allclose(freq, weights[0] / weights[0].sum(), atol=0.03)


def test_incremental_decoder_keeps_multibyte_characters():
    from lm.tokenizer import Tokenizer

    tokenizer = Tokenizer()
    text = "héllo 日本語 🎉 ok"
    ids = tokenizer.encode(text, bos=False, eos=False)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_cli_runs_on_a_saved_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    # The real 128K vocabulary (the CLI uses the Llama 3 tokenizer); everything else tiny.
    model = Transformer(tiny_config(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=128256))
    model.init_weights()
    save_pretrained(model, tmp_path / "ckpt", format="hf")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "lm.generate", "--checkpoint", str(tmp_path / "ckpt")]
    run = subprocess.run(
        [*base, "--prompt", "hi", "--max-new-tokens", "5", "--temperature", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "tokens/s" in run.stderr.strip().splitlines()[-1]

    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"])
    assert exit_info.value.code != 0
    assert "not found" in capsys.readouterr().err


def test_compiled_decode_equals_eager_and_hf(models):
    model, hf = models
    prompts = [_prompt(n, seed=30 + n) for n in (10, 4)]
    compiled = _greedy(model, prompts, n=16, compile=True)
    assert compiled == _greedy(model, prompts, n=16)
    assert compiled[0] == _hf_greedy(hf, prompts[0], n=16)
