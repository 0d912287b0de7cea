"""evaluation.needle: the needle-in-a-haystack test finds every needle with an oracle LM (one that copies the answer
from the prompt by exact text search) and none with a random model through our lm-eval backend; needles sit at the
requested depths of prompts of the requested token lengths; lengths past the model's context are refused; the CLI
writes its JSON and heat map."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

from evaluation.needle import (
    NEEDLE,
    build_prompt,
    default_max_gen_toks,
    main,
    needle_depths,
    question,
    run_needle,
)
from lm.config import LMConfig
from lm.model import Transformer
from lm.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
CONTEXT = 512


class OracleLM(LM):
    """Answers by exact copy: finds each asked key's needle sentence in the prompt and says its number."""

    def __init__(self, max_length: int = 4096) -> None:
        super().__init__()
        self.max_length = max_length
        self.seen: list[Instance] = []

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            assert request.request_type == "generate_until"
            prompt, settings = request.args
            assert settings["until"] == [".", "\n"] and settings["do_sample"] is False
            self.seen.append(request)
            names = re.search(r"special magic numbers? for (.+)\? ", prompt.rsplit("\n\n", 1)[1]).group(1)
            keys = re.split(r", | and ", names)
            numbers = [re.search(rf"The special magic number for {re.escape(k)} is (\d+)\.", prompt)[1] for k in keys]
            out.append(" " + " and ".join(numbers))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    """A random Llama 3 with the full vocabulary (the tokenizer's ids) and tiny widths."""
    config = LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
    config.max_seq_len = CONTEXT
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(seed=0)
    return model.eval()


def test_an_oracle_finds_every_needle_single_and_multi():
    oracle = OracleLM()
    single = run_needle(oracle, [256, 1024], DEPTHS, trials=2, needles=1, seed=0)
    assert all(acc == 1.0 for row in single["accuracy"].values() for acc in row.values()), single["accuracy"]
    assert len(oracle.seen) == 2 * len(DEPTHS) * 2 and single["mean"] == 1.0
    for needles, ask in ((3, None), (4, 2)):  # every needle asked; the paper's four hidden, two asked
        multi = run_needle(oracle, [512, 1024], DEPTHS, trials=2, needles=needles, seed=1, ask=ask)
        assert multi["mean"] == 1.0, multi["accuracy"]
        trial = multi["cells"][0]["trials"][0]
        assert len(trial["keys"]) == needles and len(trial["asked"]) == (ask or needles)
    # An answer that misses one of two asked numbers scores half.
    half = run_needle(_Forgetful(), [512], [0.5], trials=1, needles=2)
    assert half["mean"] == 0.5


class _Forgetful(OracleLM):
    """The oracle that says only the first number it was asked for."""

    def generate_until(self, requests, disable_tqdm: bool = False):
        return [answer.split(" and ")[0] for answer in super().generate_until(requests)]


def test_a_random_model_through_our_backend_finds_none(tiny):
    from evaluation.harness import Llama3HerdLM

    lm = Llama3HerdLM(model=tiny, batch_size=6, device="cpu")
    result = run_needle(lm, [128, 256], [0.0, 0.5, 1.0], trials=2, needles=1, seed=0)
    completions = [t["completion"] for cell in result["cells"] for t in cell["trials"]]
    assert len(completions) == 12 and all(isinstance(c, str) for c in completions)
    assert result["mean"] == 0.0, result["accuracy"]


@pytest.mark.parametrize("needles", [1, 3])
def test_needles_sit_at_the_requested_depth_of_a_prompt_of_the_requested_length(needles):
    tok = Tokenizer()
    length, gen = 2048, default_max_gen_toks(needles)
    for depth in DEPTHS:
        prompt = build_prompt(length, depth, needles, max_gen_toks=gen, rng=random.Random(f"{depth}"))
        again = build_prompt(length, depth, needles, max_gen_toks=gen, rng=random.Random(f"{depth}"))
        assert again.text == prompt.text  # deterministic for a seed
        ids = tok.encode(prompt.text, bos=True, eos=False)
        assert len(ids) == prompt.prompt_tokens and length - gen - 3 <= len(ids) <= length - gen
        sentences = [NEEDLE.format(key=k, number=n) for k, n in zip(prompt.keys, prompt.numbers, strict=True)]
        haystack_end = prompt.text.index("\n\nWhat ")
        needle_tokens = [len(tok.encode(" " + s, bos=False, eos=False)) for s in sentences]
        haystack = len(tok.encode(prompt.text[:haystack_end], bos=False, eos=False)) - sum(needle_tokens)
        assert abs(haystack - prompt.haystack_tokens) <= 3
        offsets = [prompt.text.index(s) for s in sentences]
        assert offsets == sorted(offsets)  # the first needle first, the others after it
        for i, (offset, want) in enumerate(zip(offsets, needle_depths(depth, needles), strict=True)):
            before = len(tok.encode(prompt.text[:offset].rstrip(), bos=False, eos=False)) - sum(needle_tokens[:i])
            assert abs(before / haystack - want) <= 0.05, (depth, i, before, haystack)
            # at a sentence boundary: the filler before it ends a sentence (or there is none)
            assert offset == 0 or prompt.text[:offset].rstrip()[-1] in ".!?:" or want == 1.0
        assert prompt.text.endswith("\n\n" + question(prompt.keys))  # every needle asked, in order


def test_a_length_past_the_models_context_is_refused(tiny):
    from evaluation.harness import Llama3HerdLM

    with pytest.raises(ValueError, match=r"length 1024 .*max_length=512"):
        run_needle(OracleLM(max_length=512), [256, 1024], [0.5], trials=1)
    with pytest.raises(ValueError, match=rf"length 4096 .*max_length={CONTEXT}"):
        run_needle(Llama3HerdLM(model=tiny, device="cpu"), [128, 4096], [0.5], trials=1)
    with pytest.raises(ValueError, match="too short"):
        run_needle(OracleLM(), [64], [0.5], trials=1, needles=4)


def test_the_cli_writes_the_table_json_and_heat_map(tiny, tmp_path, capsys):
    from lm.checkpoint import save_pretrained

    save_pretrained(tiny, tmp_path / "model", format="hf")
    out = tmp_path / "needle"
    main(
        ["--checkpoint", str(tmp_path / "model"), "--lengths", "128,256", "--depths", "0,1", "--trials", "1"]
        + ["--batch-size", "4", "--device", "cpu", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert "| depth \\ length | 128 | 256 |" in printed and "| 1.00 | 0.00 | 0.00 |" in printed
    written = json.loads((out / "needle.json").read_text())
    assert written["settings"]["lengths"] == [128, 256] and written["settings"]["model_max_length"] == CONTEXT
    assert set(written["accuracy"]) == {"128", "256"} and len(written["cells"]) == 4
    assert (out / "needle.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
