"""evaluation.harness: this project's models as an lm-evaluation-harness backend, proven against lm-eval's own
``hf`` backend on the same weights (a small random Llama 3 in fp32, saved in HF layout with the Llama 3 tokenizer
converted for transformers): every log-likelihood and greedy flag, rolling perplexity windows and greedy
generation agree, whatever the batch size."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from lm.config import LMConfig
from lm.generate import generate
from lm.model import Transformer
from lm.tokenizer import ChatFormat, Tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

CONTEXT = 64  # the model's context: long requests are cut from the left, long documents go in windows


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random Llama 3 (full vocabulary, tiny widths) in HF layout, with an HF tokenizer made from ours."""
    from evaluation.harness import save_hf_tokenizer
    from lm.checkpoint import save_pretrained

    path = tmp_path_factory.mktemp("lm_eval") / "model"
    config = LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
    config.max_seq_len = CONTEXT
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(seed=0)
    save_pretrained(model.eval(), path, format="hf")
    save_hf_tokenizer(path)
    return path, model.eval()


def hf_backend(path, **kwargs):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(path), device="cpu", dtype="float32", max_length=CONTEXT, **kwargs)


def ours(model, batch_size: int):
    from evaluation.harness import Llama3HerdLM

    return Llama3HerdLM(model=model, batch_size=batch_size)


PAIRS = [
    ("The picture shows", " a small red circle"),
    ("Question: What is 2 + 2?\nAnswer:", " 4"),
    ("", "Hello world"),  # an empty context is conditioned on <|begin_of_text|>
    ("A large blue square is ", "above a green star."),  # the context's trailing space moves to the continuation
    ("one two " * 40, "three four"),  # longer than the context: cut from the left
]


def test_loglikelihood_equals_the_hf_backend_at_every_batch_size(checkpoint):
    path, model = checkpoint
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    theirs = hf_backend(path, batch_size=3).loglikelihood(requests, disable_tqdm=True)
    for batch_size in (1, 3, 8):
        mine = ours(model, batch_size).loglikelihood(requests, disable_tqdm=True)
        for (a, greedy_a), (b, greedy_b) in zip(mine, theirs, strict=True):
            assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b, (batch_size, mine, theirs)


def test_greedy_flags_equal_the_hf_backend_where_the_continuation_is_the_greedy_one(checkpoint):
    path, model = checkpoint
    tok = Tokenizer()
    contexts = [tok.encode(text, bos=True, eos=False) for text in ("The picture shows", "Question: What is")]
    greedy = generate(model, tok, contexts, max_new_tokens=3, temperature=0.0)
    requests = [(None, c, g) for c, g in zip(contexts, greedy, strict=True)]
    requests += [(None, c, g[:1] + [g[0] + 1]) for c, g in zip(contexts, greedy, strict=True)]  # one token off
    mine = ours(model, 2)._loglikelihood_tokens(requests, disable_tqdm=True)
    theirs = hf_backend(path, batch_size=2)._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g for _, g in mine] == [g for _, g in theirs] == [True, True, False, False]
    assert [s for s, _ in mine] == pytest.approx([s for s, _ in theirs], abs=1e-4)


def test_rolling_loglikelihood_equals_the_hf_backend_over_several_windows(checkpoint):
    path, model = checkpoint
    text = "A small red circle is above a large blue square. " * 20  # about 220 tokens: four windows of 64
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    # lm-eval's hf backend with a tokenizer that adds <|begin_of_text|> would score the document as "<bos> <bos>
    # text" (its window prefix and the tokenizer's own); ours scores "text" after one, as the backend does for a
    # tokenizer that adds none. Compared where the two are the same computation:
    theirs = hf_backend(path, batch_size=2, add_bos_token=False).loglikelihood_rolling(requests, disable_tqdm=True)
    for batch_size in (1, 4):
        mine = ours(model, batch_size).loglikelihood_rolling(requests, disable_tqdm=True)
        assert mine == pytest.approx(theirs, abs=1e-3), (mine, theirs)
    # And it is the whole document's log-likelihood: each token predicted once (a single window when it fits).
    short = "A small red circle."
    ids = Tokenizer().encode(short, bos=True, eos=False)
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).log_softmax(-1)[0, :-1].gather(1, torch.tensor(ids[1:])[:, None])
    rolled = ours(model, 1).loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0)], True)
    assert rolled[0] == pytest.approx(float(logprobs.sum()), abs=1e-4)


def test_generate_until_equals_the_hf_backend(checkpoint):
    path, model = checkpoint
    settings = {"until": ["."], "max_gen_toks": 8, "do_sample": False}
    requests = [Instance("generate_until", {}, (c, settings), i) for i, c in enumerate(["The picture shows", "2 + 2"])]
    theirs = hf_backend(path, batch_size=2).generate_until(requests, disable_tqdm=True)
    assert ours(model, 2).generate_until(requests, disable_tqdm=True) == theirs


def test_registered_by_name_loaded_from_a_checkpoint_and_chat_template(checkpoint):
    from lm_eval.api.registry import get_model

    from evaluation.harness import Llama3HerdLM

    path, model = checkpoint
    assert get_model("llama3herd") is Llama3HerdLM
    loaded = Llama3HerdLM.create_from_arg_string(f"checkpoint={path},batch_size=2")
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS[:2])]
    assert loaded.loglikelihood(requests, True) == ours(model, 2).loglikelihood(requests, True)
    dialog = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What colour is it?"}]
    text = loaded.apply_chat_template(dialog)
    assert loaded.tok_encode(text) == ChatFormat(Tokenizer()).encode_dialog_prompt(dialog)
    with pytest.raises(ValueError, match="dtype"):
        Llama3HerdLM(checkpoint=str(path), dtype="float8")
    with pytest.raises(ValueError, match="chekpoint"):
        Llama3HerdLM.create_from_arg_string(f"chekpoint={path}")


def test_the_embedded_scene_colour_task_runs_offline_through_lm_eval(checkpoint):
    """lm-eval reads the committed task (YAML + JSONL, regenerated byte for byte by evaluation.tasks) from local
    files and scores it with our backend: its accuracy is the share of scenes whose colour gets the highest
    log-likelihood among the six, computed here from the backend directly."""
    import json

    from lm_eval import simple_evaluate

    from data.scenes import COLOURS
    from evaluation.harness import task_manager
    from evaluation.tasks import TASKS_DIR, scene_colour_rows

    rows = scene_colour_rows(200)
    committed = (TASKS_DIR / "scene_colour.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in committed] == rows
    _, model = checkpoint
    backend = ours(model, 16)
    result = simple_evaluate(
        model=backend, tasks=["scene_colour"], task_manager=task_manager(["scene_colour"], [TASKS_DIR]), limit=30
    )
    requests = [
        Instance("loglikelihood", {}, (f"{row['text']} The {row['shape']} is", f" {colour}"), 0)
        for row in rows[:30]
        for colour in COLOURS
    ]
    scores = torch.tensor([s for s, _ in backend.loglikelihood(requests, True)]).view(30, len(COLOURS))
    expected = (scores.argmax(1) == torch.tensor([row["gold"] for row in rows[:30]])).float().mean().item()
    assert result["results"]["scene_colour"]["acc,none"] == pytest.approx(expected)


def test_any_checkpoint_the_project_reads_loads_the_same_lm(tmp_path):
    """A ``train/lm.py`` run (its newest checkpoint), one of its step directories, and a Llama3MM directory (its
    frozen LM) give the model that was saved, logit for logit."""
    from conftest import save_run, tiny_model

    from evaluation.harness import load_lm
    from llama3mm import Llama3MM

    model = tiny_model(seed=3)
    save_run(model, tmp_path / "run")
    Llama3MM(model).save_pretrained(tmp_path / "mm")  # an LM with no path of its own is written beside the parts
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)
        for path in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-1", tmp_path / "mm"):
            torch.testing.assert_close(load_lm(path, "cpu", torch.float32)(tokens), want, rtol=0, atol=1e-6)


def test_ranks_split_the_documents_and_rank_zero_reports_every_one(checkpoint, tmp_path):
    """``torchrun -m evaluation`` on 2 ranks: each rank scores half of the documents (its progress bar counts half
    of the requests), rank 0 alone prints and writes the results, and every document's scores and the accuracy
    equal a 1-rank run's."""
    import json

    from dist_utils import torchrun

    from evaluation.tasks import TASKS_DIR

    path, _ = checkpoint
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"ranks{nproc}"
        args = ["evaluation", "--model", "llama3herd", "--model_args", f"checkpoint={path}", "--batch_size", "4"]
        args += ["--device", "cpu", "--include_path", str(TASKS_DIR), "--tasks", "scene_colour", "--limit", "21"]
        job = torchrun("-m", nproc, [*args, "--log_samples", "--output_path", str(out)], timeout=300)
        assert job.returncode == 0, job.stderr[-3000:]
        # 21 documents of 6 choices; on 2 ranks, 11 and 10, the second padded to 11 as lm-eval pads ranks.
        per_rank = {1: 126, 2: 66}[nproc]
        assert f"{per_rank}/{per_rank}" in job.stderr
        assert job.stdout.count("|scene_colour|") == 1  # one table, from rank 0
        (results,) = out.rglob("results_*.json")
        (samples,) = out.rglob("samples_scene_colour_*.jsonl")
        docs = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda d: d["doc_id"])
        runs[nproc] = json.loads(results.read_text())["results"]["scene_colour"]["acc,none"], docs
    (acc1, docs1), (acc2, docs2) = runs[1], runs[2]
    assert [d["doc_id"] for d in docs2] == list(range(21)) == [d["doc_id"] for d in docs1]
    for one, two in zip(docs1, docs2, strict=True):
        scores1 = [float(score) for score, _ in one["filtered_resps"]]
        scores2 = [float(score) for score, _ in two["filtered_resps"]]
        assert scores2 == pytest.approx(scores1, abs=1e-5)
    assert acc2 == acc1
