"""SFT: the assistant-only label mask, chat-file errors naming file:line, packing with document ids and resume,
and `train/sft.py` runs whose 2-rank FSDP losses equal one rank's and fall."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from data import scenes
from data.chat import IGNORE_INDEX, ChatDataError, PackedDialogs, encode_dialog, pack_dialogs, read_dialogs
from data.default import arithmetic_problem, sentence, word_problem
from data.instruct import (
    HELDOUT_FILE,
    INVERSE_RELATION,
    KINDS,
    TRAIN_FILE,
    grade,
    make_dialogs,
    prompt_of,
    write_instruct_data,
)
from lm.tokenizer import ChatFormat, Tokenizer
from tests.dist_utils import torchrun
from train.metrics import read_metrics

DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What colour is the star?"},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And 2 + 3?"},
    {"role": "assistant", "content": "5."},
]


@pytest.fixture(scope="module")
def chat():
    return ChatFormat(Tokenizer())


def test_labels_are_the_assistant_turns_content_and_end_of_turn(chat):
    tok = chat.tokenizer
    encoded = encode_dialog(DIALOG, chat)
    assert encoded.ids == chat.encode_dialog_prompt(DIALOG)[: -len(chat.encode_header("assistant"))]
    want = [IGNORE_INDEX]  # <|begin_of_text|>
    for message in DIALOG:
        header, turn = chat.encode_header(message), chat.encode_message(message)
        trained = message["role"] == "assistant"
        want += [IGNORE_INDEX] * len(header) + (
            turn[len(header) :] if trained else [IGNORE_INDEX] * (len(turn) - len(header))
        )
    assert encoded.labels == want
    trained = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert tok.decode(trained) == "Red.<|eot_id|>5.<|eot_id|>"


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"messages": [{"content": "hi"}]}, "message 0 has no role"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty assistant"),
        (
            {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]},
            "tokens, over",
        ),
        ({"prompt": "hi"}, "no 'messages'"),
    ],
    ids=["missing-role", "unknown-role", "empty-answer", "over-long", "no-messages"],
)
def test_a_bad_row_is_an_error_naming_file_and_line_or_skipped(tmp_path, chat, row, reason):
    path = tmp_path / "chat.jsonl"
    good = {"messages": DIALOG}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ChatDataError, match=f"^{path}:3: .*{reason}"):
        read_dialogs([path], chat, max_tokens=257)
    dialogs, skipped = read_dialogs([path], chat, max_tokens=257, skip_bad=True)
    assert (len(dialogs), skipped) == (2, 1)


def test_parquet_rows_read_like_jsonl(tmp_path, chat):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"messages": DIALOG}, {"messages": DIALOG[:3]}]), tmp_path / "chat.parquet")
    dialogs, _ = read_dialogs([tmp_path / "chat.parquet"], chat, max_tokens=257)
    assert dialogs == [encode_dialog(DIALOG, chat), encode_dialog(DIALOG[:3], chat)]


def _packed(dialogs, **kwargs):
    return PackedDialogs(
        dialogs, **{"seq_len": 127, "batch_size": 4, "dp_rank": 0, "dp_size": 1, "grad_accum": 1, "seed": 0, **kwargs}
    )


def test_packing_keeps_dialogs_whole_and_data_parallel_shares_make_the_global_batch(chat):
    dialogs = [encode_dialog(d["messages"], chat) for d in make_dialogs(60, seed=3)]
    one = _packed(dialogs)
    batches = [next(one) for _ in range(12)]  # past the first epoch
    whole = {tuple(d.ids): tuple(d.labels) for d in dialogs}
    for batch in batches:
        for ids, labels, docs in zip(batch["tokens"], batch["labels"], batch["document_ids"], strict=True):
            starts = [i for i in range(len(ids)) if i == 0 or docs[i] != docs[i - 1]]
            for start, end in zip(starts, [*starts[1:], len(ids)], strict=True):
                piece = tuple(ids[start:end].tolist())
                if piece in whole:  # a whole dialog, with its own labels
                    assert tuple(labels[start:end].tolist()) == whole[piece]
                else:  # the row's padding: last, and never a target
                    assert end == len(ids) and (labels[start:end] == IGNORE_INDEX).all()
    two = [_packed(dialogs, dp_rank=r, dp_size=2, grad_accum=2) for r in range(2)]
    for step, batch in enumerate(batches):
        shares = [next(loader) for loader in two for _ in range(2)]  # rank 0's two micro-batches, then rank 1's
        for key in ("tokens", "labels", "document_ids"):
            assert torch.equal(torch.cat([s[key] for s in shares]), batch[key]), (step, key)
        targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        assert batch["loss_scale"].item() == pytest.approx(1 / targets)
        assert shares[0]["loss_scale"].item() == pytest.approx(4 / targets)
    resumed = _packed(dialogs)
    resumed.load_state_dict(json.loads(json.dumps(_state_after(dialogs, 7))))
    assert torch.equal(next(resumed)["tokens"], batches[7]["tokens"])
    longest = max(range(len(dialogs)), key=lambda i: len(dialogs[i].ids))
    with pytest.raises(ValueError, match=f"dialog {longest} is {len(dialogs[longest].ids)} tokens, longer than a row"):
        pack_dialogs(dialogs, width=len(dialogs[longest].ids) - 1, seed=0)


def _state_after(dialogs, steps):
    loader = _packed(dialogs)
    for _ in range(steps):
        next(loader)
    return loader.state_dict()


def test_instruct_data_holds_out_its_prompts_and_grades_its_answers(tmp_path):
    write_instruct_data(tmp_path, train=300, heldout=50)
    rows = {
        name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        for name in (TRAIN_FILE, HELDOUT_FILE)
    }
    held = {json.dumps(prompt_of(d)) for d in rows[HELDOUT_FILE]}
    assert not held & {json.dumps(prompt_of(d)) for d in rows[TRAIN_FILE]}
    assert {d["kind"] for d in rows[TRAIN_FILE]} == set(KINDS)
    for d in rows[HELDOUT_FILE]:
        assert grade(d["kind"], d["messages"][-1]["content"], d["answer"], prompt_of(d)[-1]["content"])
    assert not grade("colour", "The star is blue.", "red") and not grade("math", "The answer is 41.", "42")


def test_relations_and_translations_are_graded_on_what_they_say():
    """A relation is the first one named, whichever way round the question put the objects; a translation must be
    the word tables' sentence word for word (case and punctuation aside), so an English echo or one wrong word
    fails."""
    scene = scenes.Scene(
        (
            scenes.SceneObject("circle", "red", "small", 0.2, 0.5),
            scenes.SceneObject("square", "blue", "large", 0.8, 0.5),
        )
    )
    assert (
        scenes.relation(*scene.objects) == "to the left of" and INVERSE_RELATION["to the left of"] == "to the right of"
    )
    assert grade("relation", "The small red circle is to the left of the large blue square.", "to the left of")
    assert not grade("relation", "It is to the right of it, not to the left of it.", "to the left of")
    assert not grade("relation", "The circle is left.", "to the left of")
    target = sentence(scenes.translate_caption(scene, "de"))
    assert grade("translation", target.upper().rstrip("."), target)
    assert not grade("translation", sentence(scenes.caption(scene)), target)
    assert not grade("translation", target.replace("rote", "blaue"), target), target


def test_a_right_number_after_a_false_step_is_graded_wrong():
    """The grader checks every worked step, as the paper filters reasoning traces with incorrect steps: a policy's
    "3 boxes of 3 make 3 * 3 = 12" would otherwise be chosen as right and teach the false fact."""
    assert grade("math", "3 boxes of 4 make 3 * 4 = 12. The answer is 12.", "12")
    assert not grade("math", "3 boxes of 3 make 3 * 3 = 12. The answer is 12.", "12")
    assert not grade("math", "2 * 9 = 12, so 12 / 2 = 6. The answer is 6.", "6")
    assert grade("math", "7 * 23 = 7 * 20 + 7 * 3 = 140 + 21 = 161. The answer is 161.", "161")
    assert not grade("math", "7 * 23 = 7 * 20 + 7 * 3 = 140 + 20 = 161. The answer is 161.", "161")
    assert not grade("math", "5 / 0 = 0. The answer is 0.", "0")
    rng = random.Random(0)
    for i in range(2_000):  # every worked answer of the corpus and the instruction data holds, of every size
        text = (word_problem if i % 2 else arithmetic_problem)(rng, small=i % 4 < 2)
        question, answer = text.removeprefix("Question: ").split("\nAnswer: ")
        assert grade("math", answer, answer.rsplit("The answer is ", 1)[1].rstrip("."), question), answer


def test_a_right_number_about_someone_else_or_from_other_numbers_is_graded_wrong():
    """Given the question, a worked answer must keep to it: the policy's "Jonas starts with 11 and gives away 3, so
    11 - 3 = 8" for Hugo's 11 circles, or a right number reached from numbers the question does not give, is wrong
    (one right sum in twenty of a round's samples); the answer a step reaches may come first, as division's does."""
    question = "Hugo has 11 orange circles and gives 3 to Anna. How many orange circles does Hugo have left?"
    right = "Hugo starts with 11 and gives away 3, so 11 - 3 = 8. The answer is 8."
    assert grade("math", right, "8", question)
    assert not grade("math", right.replace("Hugo", "Jonas"), "8", question)
    assert not grade("math", "Hugo starts with 10 and gives away 2, so 10 - 2 = 8. The answer is 8.", "8", question)
    assert not grade("math", "Hugo starts with 12 and gives away 3, so 11 - 3 = 8. The answer is 8.", "8", question)
    assert grade("math", right.replace("Hugo", "Jonas"), "8")  # no question: the number and the steps only
    assert grade("math", "7 * 2 = 14, so 14 / 7 = 2. The answer is 2.", "2", "What is 14 / 7?")
    assert not grade("math", "3 * 2 = 6, so 6 / 2 = 3. The answer is 2.", "2", "What is 6 / 3?")


def test_embedded_data_of_an_earlier_version_is_written_again(tmp_path):
    """Files without the current version (an earlier version's 2,000 dialogs) are replaced, and pairs made from an
    instruction set that was replaced are made again; current files are left as they are."""
    from data.instruct import DATA_VERSION, VERSION_FILE, ensure_instruct_data
    from data.preference import PREFERENCE_FILE, ensure_preference_data

    write_instruct_data(tmp_path, train=30, heldout=10)
    ensure_preference_data(tmp_path)
    stamp = (tmp_path / TRAIN_FILE).stat().st_mtime_ns
    ensure_instruct_data(tmp_path)
    assert (tmp_path / TRAIN_FILE).stat().st_mtime_ns == stamp
    (tmp_path / VERSION_FILE).unlink()  # as an earlier version left it
    pairs = (tmp_path / PREFERENCE_FILE).read_text()
    ensure_preference_data(tmp_path)
    assert len((tmp_path / TRAIN_FILE).read_text().splitlines()) > 1000
    assert (tmp_path / PREFERENCE_FILE).read_text() != pairs
    assert json.loads((tmp_path / VERSION_FILE).read_text()) == {"instruct": DATA_VERSION, "preference": DATA_VERSION}


# ---------------------------------------------------------------- torchrun train/sft.py

STEPS = 8


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    """A tiny Llama 3 (full vocabulary) checkpoint and a small instruction data set."""
    from lm import LMConfig, Transformer, save_pretrained

    root = tmp_path_factory.mktemp("sft")
    write_instruct_data(root / "instruct", train=200, heldout=20)
    torch.manual_seed(0)
    model = Transformer(LMConfig.from_preset("debug", dim=64, n_layers=2, n_heads=4, n_kv_heads=2))
    model.init_weights()
    save_pretrained(model, root / "init", format="hf")
    yield root
    shutil.rmtree(root, ignore_errors=True)  # its checkpoints of the 128K-vocabulary LM: freed after the module


def _sft(root, run_dir, nproc, *extra):
    argv = [
        "--config", "configs/posttrain/sft_tiny.toml",
        f"--run.dir={run_dir}",
        f"--data.files={root / 'instruct' / TRAIN_FILE}",
        "--data.seq_len=128",
        f"--model.init_from={root / 'init'}",
        "--train.batch_size=4",
        f"--train.steps={STEPS}",
        "--optim.lr=1e-2",
        "--optim.warmup_steps=1",
        "--metrics.log_interval=1",
        "--checkpoint.enable=false",
        *extra,
    ]  # fmt: skip
    proc = torchrun("train/sft.py", nproc, argv, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return read_metrics(str(run_dir))


def _losses(records):
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def one_rank(sft_setup):
    """One rank, checkpointed halfway."""
    run_dir = sft_setup / "sft1"
    _sft(sft_setup, run_dir, 1, "--checkpoint.enable=true", f"--checkpoint.interval={STEPS // 2}")
    return run_dir


def test_sft_loss_falls(one_rank):
    losses = _losses(read_metrics(str(one_rank)))
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 2.0, losses


def test_two_rank_fsdp_sft_matches_one_rank_and_grades_held_out_prompts(sft_setup, one_rank):
    """FSDP with gradient accumulation: each rank's share of each global batch holds a different number of
    assistant tokens, and the loss is still the global batch's token mean. The final eval gathers the weights
    and rank 0 answers held-out prompts."""
    heldout = sft_setup / "instruct" / HELDOUT_FILE
    evals = ["--eval.samples=3", "--eval.max_new_tokens=4", f"--eval.file={heldout}"]
    evals += ['--eval.tasks=["scene_colour"]', "--eval.limit=6"]  # and an lm-eval task's metrics beside them
    records = _sft(sft_setup, sft_setup / "sft2", 2, "--train.grad_accum=2", *evals)
    want, got = _losses(read_metrics(str(one_rank))), _losses(records)
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    assert 0 <= records[-1]["eval/accuracy"] <= 1 and records[-1]["eval/chance"] > 0
    assert 0 <= records[-1]["eval/scene_colour/acc"] <= 1 and records[-1]["eval/scene_colour/nll"] > 0


def test_whole_logits_loss_equals_the_chunked_one(sft_setup, one_rank):
    """--model.loss=plain (F.cross_entropy summed over the targets) gives the chunked loss's figures."""
    records = _sft(
        sft_setup,
        sft_setup / "sft_plain",
        1,
        "--model.loss=plain",
        "--train.steps=3",
        f"--optim.schedule_steps={STEPS}",
    )
    want, got = _losses(read_metrics(str(one_rank))), _losses(records)
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


def test_resumed_onto_two_ranks_continues_exactly(sft_setup, one_rank):
    """Saved by one rank halfway, resumed by two: the data position and weights carry over."""
    checkpoint = one_rank / "checkpoints" / f"step-{STEPS // 2}"
    records = _sft(sft_setup, sft_setup / "sft_resumed", 2, f"--checkpoint.resume={checkpoint}")
    want, got = _losses(read_metrics(str(one_rank))), _losses(records)
    assert sorted(got) == list(range(STEPS // 2 + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


def test_sft_teaches_held_out_answers_far_above_chance(sft_setup, tmp_path):
    """The short version of the tiny SFT run (configs/posttrain/sft_tiny.toml's settings; its full figures are in
    bench/RESULTS.md): 300 steps from a random LM answer held-out questions about scenes and sums, graded greedily,
    far above chance (0.25 against 0.08 when written); the count questions, the first skill learnt, most of the time;
    and most answers stop."""
    write_instruct_data(tmp_path / "instruct", train=6000, heldout=60, seed=1)
    argv = [
        "--config", "configs/posttrain/sft_tiny.toml",
        f"--run.dir={tmp_path / 'run'}",
        f"--data.dir={tmp_path / 'instruct'}",
        f"--model.init_from={sft_setup / 'init'}",
        "--train.steps=300",
        "--train.eval_interval=300",
        "--eval.samples=60",
        "--eval.max_new_tokens=24",
        "--checkpoint.enable=false",
    ]  # fmt: skip
    proc = torchrun("train/sft.py", 1, argv, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    final = [r for r in read_metrics(str(tmp_path / "run")) if "eval/accuracy" in r][-1]
    assert final["eval/accuracy"] >= max(0.2, 2 * final["eval/chance"]), final
    assert final["eval/accuracy/count"] >= 0.6 and final["eval/stopped"] >= 0.7, final


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["--parallel.cp=2"], 2, "data and tensor parallel only"),
        (["--parallel.pp=2"], 2, "data and tensor parallel only"),
        (["--parallel.tp=2", "--model.n_kv_heads=1"], 2, "parallel.tp=2 must divide n_kv_heads=1"),
        (["--model.vocab_size=1000"], 1, "lacks the Llama 3 chat format's tokens"),
        (["--data.seq_len=200000"], 1, "exceeds the model's max_seq_len"),
    ],
    ids=["cp", "pp", "tp-heads", "small-vocab", "long-rows"],
)
def test_config_errors_before_any_process_group(overrides, world, message):
    from train.config import load_config
    from train.sft import SFTJobConfig, validate

    cfg = load_config(SFTJobConfig, "configs/posttrain/sft_tiny.toml", ["--model.init_from=", *overrides])
    with pytest.raises(ValueError, match=message):
        validate(cfg, world)
