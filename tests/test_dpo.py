"""DPO: preference rows' masks and errors, the embedded pairs, and `train/dpo.py` runs whose reference is the
initial policy, whose 2-rank FSDP losses equal one rank's, whose margins grow, and which resume exactly."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from data.chat import IGNORE_INDEX, ChatDataError, formatting_mask
from data.instruct import HELDOUT_FILE, KINDS, TRAIN_FILE, grade, prompt_of
from data.preference import (
    HELDOUT_PREFERENCE_FILE,
    PREFERENCE_FILE,
    PreferenceBatches,
    answer_difference,
    balance_answer_words,
    further_heldout,
    read_preferences,
    write_preference_data,
)
from lm.tokenizer import ChatFormat, Tokenizer
from tests.dist_utils import torchrun
from train.metrics import read_metrics

ROW = {
    "prompt_messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour is the star?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And 2 + 3?"},
    ],
    "chosen": "5.",
    "rejected": "6.",
}


@pytest.fixture(scope="module")
def chat():
    return ChatFormat(Tokenizer())


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_preference_rows_masks_train_the_final_answer_dpo_without_formatting(tmp_path, chat):
    """Labels: only the last answer and its end of turn (not the prompt's own assistant turn); the DPO term drops
    the end of turn, the NLL term keeps it."""
    (pair,), _ = read_preferences([_write(tmp_path / "p.jsonl", [ROW])], chat, max_tokens=257)
    tok = chat.tokenizer
    for dialog, answer in ((pair.chosen, "5."), (pair.rejected, "6.")):
        want_ids = chat.encode_dialog_prompt([*ROW["prompt_messages"], {"role": "assistant", "content": answer}])
        assert dialog.ids == want_ids[: -len(chat.encode_header("assistant"))]
        targets = torch.tensor(dialog.labels[1:])
        nll = targets != IGNORE_INDEX
        dpo = nll & ~formatting_mask(torch.tensor(dialog.ids[1:]), tok)
        assert tok.decode(targets[nll].tolist()) == answer + "<|eot_id|>"
        assert tok.decode(targets[dpo].tolist()) == answer
    (plain,), _ = read_preferences([_write(tmp_path / "q.jsonl", [{**ROW, "prompt_messages": None, "prompt": "Hi"}])],
                                   chat, max_tokens=257)  # fmt: skip
    assert (
        plain.chosen.ids
        == chat.encode_dialog_prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "5."}])[:-4]
    )


def test_the_formatting_mask_ablation_keeps_every_labelled_token_in_the_dpo_term(tmp_path, chat):
    """--dpo.mask_formatting=false (the ablation): the DPO term counts the end of turn as the NLL term does."""
    from types import SimpleNamespace

    from lm import LMConfig, Transformer
    from train.dpo import DPOJobConfig, answer_logps

    (pair,), _ = read_preferences([_write(tmp_path / "p.jsonl", [ROW])], chat, max_tokens=257)
    data = PreferenceBatches([pair], seq_len=64, batch_size=1, dp_rank=0, dp_size=1, grad_accum=1, seed=0)
    model = Transformer(LMConfig.from_preset("debug", dim=64, n_layers=1, n_heads=4, n_kv_heads=2))
    model.init_weights(seed=0)
    ctx = SimpleNamespace(dims=SimpleNamespace(cp=1, tp=1), device=torch.device("cpu"))
    masks = {}
    for mask_formatting in (True, False):
        cfg = DPOJobConfig()
        cfg.dpo.mask_formatting = mask_formatting
        with torch.no_grad():
            _, dpo_mask, nll_mask = answer_logps(model, cfg, ctx, data.rows([0]))
        masks[mask_formatting] = dpo_mask
    assert torch.equal(masks[False], nll_mask)
    assert (nll_mask & ~masks[True]).sum() == 2  # each answer's <|eot_id|>, kept only by the ablation


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"chosen": "a", "rejected": "b"}, "no 'prompt' or 'prompt_messages'"),
        ({**ROW, "rejected": None}, "missing or not a string"),
        ({**ROW, "chosen": "  "}, "empty assistant answer"),
        ({**ROW, "prompt_messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
        ({**ROW, "edited": ""}, "empty assistant answer"),
        ({**ROW, "chosen": "word " * 300}, "tokens, over"),
    ],
    ids=["no-prompt", "no-rejected", "empty-chosen", "unknown-role", "empty-edited", "over-long"],
)
def test_a_bad_preference_row_is_an_error_naming_file_and_line_or_skipped(tmp_path, chat, row, reason):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(ROW) + "\n\n" + json.dumps(row) + "\n" + json.dumps(ROW) + "\n")
    with pytest.raises(ChatDataError, match=f"^{path}:3: .*{reason}"):
        read_preferences([path], chat, max_tokens=257)
    pairs, skipped = read_preferences([path], chat, max_tokens=257, skip_bad=True)
    assert (len(pairs), skipped) == (2, 1)


def test_embedded_pairs_prefer_the_right_answer_and_hold_out_the_eval_prompts(tmp_path):
    path = write_preference_data(tmp_path, pairs=300)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    held = {json.dumps(prompt_of(json.loads(line))) for line in (tmp_path / HELDOUT_FILE).read_text().splitlines()}
    assert not held & {json.dumps(r["prompt_messages"]) for r in rows}
    assert {r["kind"] for r in rows} == set(KINDS)
    heldout_rows = [json.loads(line) for line in (tmp_path / HELDOUT_PREFERENCE_FILE).read_text().splitlines()]
    assert {json.dumps(r["prompt_messages"]) for r in heldout_rows} == held
    for r in rows + heldout_rows:
        assert grade(r["kind"], r["chosen"], r["answer"]) and not grade(r["kind"], r["rejected"], r["answer"]), r


def test_further_heldout_prompts_are_distinct_in_no_data_file_and_a_wider_draw_begins_with_them(tmp_path):
    write_preference_data(tmp_path, pairs=300)
    seen = set()
    for name in (TRAIN_FILE, HELDOUT_FILE, PREFERENCE_FILE, HELDOUT_PREFERENCE_FILE):
        for line in (tmp_path / name).read_text().splitlines():
            row = json.loads(line)
            seen.add(json.dumps(row["messages"][:-1] if "messages" in row else row["prompt_messages"], sort_keys=True))
    rows = further_heldout(tmp_path, 1000)  # the rounds' count; the draw repeats 3 of its prompts
    prompts = {json.dumps(prompt_of(r), sort_keys=True) for r in rows}
    assert len(rows) == len(prompts) == 1000 and not prompts & seen  # each prompt once, and in no file
    assert {r["kind"] for r in rows} == set(KINDS)
    assert all(grade(r["kind"], r["messages"][-1]["content"], r["answer"]) for r in rows)
    assert further_heldout(tmp_path, 1500)[:1000] == rows


def _colour_row(chosen: str, rejected: str, kind: str = "colour") -> dict:
    answers = {"chosen": f"The star is {chosen}.", "rejected": f"The star is {rejected}."}
    return {"prompt": "What colour is the star?", **answers, **({"kind": kind} if kind else {})}


def test_balancing_answer_words_keeps_each_word_about_as_often_chosen_as_rejected(tmp_path, chat, caplog):
    """A policy that says "blue" too often: 300 pairs reject blue for red, 100 choose it over red. Kept, blue is
    chosen about as often as rejected; other kinds, and rows without a kind, are all kept; reading balances alike."""
    rows = [_colour_row("red", "blue")] * 300 + [_colour_row("blue", "red")] * 100
    rows += [_colour_row("red", "blue", kind="math")] * 50 + [_colour_row("red", "blue", kind="")] * 20
    assert answer_difference(rows[0]) == ("colour", frozenset({"red"}), frozenset({"blue"}))
    keep = balance_answer_words([answer_difference(r) for r in rows], {"colour"}, seed=0)
    rejecting_blue, choosing_blue = sum(keep[:300]), sum(keep[300:400])
    assert choosing_blue == 100 and 75 <= rejecting_blue <= 125  # 1/3 of 300 kept, binomial spread
    assert all(keep[400:])
    assert keep == balance_answer_words([answer_difference(r) for r in rows], {"colour"}, seed=0)
    assert keep != balance_answer_words([answer_difference(r) for r in rows], {"colour"}, seed=1)
    assert all(balance_answer_words([answer_difference(r) for r in rows], {"shape"}, seed=0))
    path = _write(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="data.preference"):
        pairs, _ = read_preferences([path], chat, max_tokens=64, balance_kinds=["colour"], seed=0)
    assert f"balancing the answer words of colour kept {sum(keep[:400])} of their 400 pairs" in caplog.text
    assert len(pairs) == sum(keep) and len(read_preferences([path], chat, max_tokens=64)[0]) == len(rows)


def test_preference_batches_share_the_global_batch_and_resume(tmp_path, chat):
    write_preference_data(tmp_path, pairs=40)
    pairs, _ = read_preferences([tmp_path / PREFERENCE_FILE], chat, max_tokens=257)

    def batches(**kwargs):
        args = {"seq_len": 127, "batch_size": 4, "dp_rank": 0, "dp_size": 1, "grad_accum": 1, "seed": 0, **kwargs}
        return PreferenceBatches(pairs, **args)

    one = batches()
    whole = [next(one) for _ in range(15)]  # past the first epoch
    flat = [i for b in whole for i in b["index"].tolist()]
    assert sorted(flat[: len(pairs)]) == list(range(len(pairs)))  # each pair once an epoch
    two = [batches(dp_rank=r, dp_size=2, grad_accum=2) for r in range(2)]
    for batch in whole:
        shares = [next(loader) for loader in two for _ in range(2)]
        assert torch.equal(torch.cat([s["index"] for s in shares]), batch["index"])
        assert shares[0]["nll_tokens"].item() == pytest.approx(batch["nll_tokens"].item() / 4)
        chosen = batch["tokens"][:4]
        assert torch.equal(torch.cat([s["tokens"][:1] for s in shares]), chosen)
    resumed = batches()
    resumed.load_state_dict(json.loads(json.dumps({"steps_taken": 11, "seed": 0})))
    assert torch.equal(next(resumed)["tokens"], whole[11]["tokens"])


# ---------------------------------------------------------------- torchrun train/dpo.py

STEPS = 8


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory):
    """A tiny Llama 3 (full vocabulary) checkpoint and 16 preference pairs (4 epochs of 4-pair batches)."""
    from lm import LMConfig, Transformer, save_pretrained

    root = tmp_path_factory.mktemp("dpo")
    write_preference_data(root / "data", pairs=16)
    torch.manual_seed(0)
    model = Transformer(LMConfig.from_preset("debug", dim=64, n_layers=2, n_heads=4, n_kv_heads=2))
    model.init_weights()
    save_pretrained(model, root / "init", format="hf")
    yield root
    shutil.rmtree(root, ignore_errors=True)  # its checkpoints of the 128K-vocabulary LM: freed after the module


def _dpo(root, run_dir, nproc, *extra):
    argv = [
        "--config", "configs/posttrain/dpo_tiny.toml",
        f"--run.dir={run_dir}",
        f"--data.files={root / 'data' / PREFERENCE_FILE}",
        "--data.seq_len=128",
        f"--model.init_from={root / 'init'}",
        "--train.batch_size=4",
        f"--train.steps={STEPS}",
        "--optim.lr=3e-3",
        "--optim.warmup_steps=1",
        "--metrics.log_interval=1",
        "--checkpoint.enable=false",
        f"--eval.pairs_file={root / 'data' / HELDOUT_PREFERENCE_FILE}",
        "--eval.pairs=8",
        *extra,
    ]  # fmt: skip
    proc = torchrun("train/dpo.py", nproc, argv, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return read_metrics(str(run_dir))


def _losses(records):
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def one_rank(dpo_setup):
    """One rank, checkpointed halfway."""
    run_dir = dpo_setup / "dpo1"
    _dpo(dpo_setup, run_dir, 1, "--checkpoint.enable=true", f"--checkpoint.interval={STEPS // 2}")
    return run_dir


def test_dpo_raises_the_chosen_vs_rejected_margin(one_rank):
    """At step 1 the policy is the reference (margin 0); after a few passes over its 16 pairs it prefers the chosen
    answer of nearly every one."""
    records = {r["step"]: r for r in read_metrics(str(one_rank))}
    assert sorted(records) == list(range(1, STEPS + 1))
    assert abs(records[1]["rewards/margin"]) < 1e-3
    late = [records[s] for s in range(STEPS - 1, STEPS + 1)]
    assert min(r["rewards/accuracy"] for r in late) >= 0.75, late
    assert min(r["rewards/margin"] for r in late) > 0.05, late
    assert 0 <= records[STEPS]["eval/reward_accuracy"] <= 1 and "eval/reward_margin" in records[STEPS]


def test_two_rank_fsdp_dpo_matches_one_rank_and_its_reference_is_the_initial_policy(dpo_setup, one_rank, chat):
    """FSDP with gradient accumulation gives one rank's losses; the stored reference equals the initial
    model's sequence log-likelihoods, pair by pair; the final eval grades held-out prompts."""
    from lm import load_pretrained
    from lm.loss import token_logprobs_output_fn
    from train.dpo import REFERENCE_FILE
    from train.posttrain.losses import sequence_logps

    heldout = dpo_setup / "data" / HELDOUT_FILE
    evals = ["--eval.samples=3", "--eval.max_new_tokens=4", f"--eval.file={heldout}"]
    evals += ['--eval.tasks=["scene_colour"]', "--eval.limit=6"]  # and an lm-eval task's metrics beside them
    records = _dpo(dpo_setup, dpo_setup / "dpo2", 2, "--train.grad_accum=2", *evals)
    want, got = _losses(read_metrics(str(one_rank))), _losses(records)
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    assert 0 <= records[-1]["eval/accuracy"] <= 1 and records[-1]["eval/chance"] > 0
    assert 0 <= records[-1]["eval/scene_colour/acc"] <= 1 and records[-1]["eval/scene_colour/nll"] > 0

    stored = torch.load(dpo_setup / "dpo2" / REFERENCE_FILE, weights_only=True)["train"]
    model = load_pretrained(dpo_setup / "init").eval()
    pairs, _ = read_preferences([dpo_setup / "data" / PREFERENCE_FILE], chat, max_tokens=129)
    for index, pair in enumerate(pairs):
        for side, dialog in enumerate((pair.chosen, pair.rejected)):
            ids, labels = torch.tensor([dialog.ids]), torch.tensor([dialog.labels])
            with torch.no_grad():
                logps = model(ids[:, :-1], output=token_logprobs_output_fn(labels[:, 1:]))
            mask = (labels[:, 1:] != IGNORE_INDEX) & ~formatting_mask(ids[:, 1:], chat.tokenizer)
            assert stored[index, side].item() == pytest.approx(sequence_logps(logps, mask).item(), abs=1e-4)


def test_an_online_frozen_reference_gives_the_precomputed_one_s_losses(dpo_setup, one_rank):
    """--dpo.reference=online (a frozen sharded copy of the initial policy scoring each micro-batch) on 2 ranks:
    the 1-rank precomputed run's losses and held-out reward figures, and no stored reference file."""
    from train.dpo import REFERENCE_FILE

    run_dir = dpo_setup / "dpo_online"
    records = _dpo(dpo_setup, run_dir, 2, "--dpo.reference=online")
    want, got = _losses(read_metrics(str(one_rank))), _losses(records)
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    last = read_metrics(str(one_rank))[-1]
    assert records[-1]["eval/reward_margin"] == pytest.approx(last["eval/reward_margin"], rel=1e-4, abs=1e-6)
    assert not (run_dir / REFERENCE_FILE).exists()


def test_resumed_onto_two_ranks_continues_exactly(dpo_setup, one_rank):
    """Saved by one rank halfway, resumed by two in a fresh run dir: the reference is recomputed from the initial
    weights, and the data position and weights carry over."""
    checkpoint = one_rank / "checkpoints" / f"step-{STEPS // 2}"
    records = _dpo(dpo_setup, dpo_setup / "dpo_resumed", 2, f"--checkpoint.resume={checkpoint}")
    want, got = _losses(read_metrics(str(one_rank))), _losses(records)
    assert sorted(got) == list(range(STEPS // 2 + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


def _reference_case(tmp_path, chat, micro: int, *overrides: str):
    """The tiny DPO config, a one-rank context scoring ``micro`` pairs a forward, 6 pairs in batches of 4, a model."""
    from types import SimpleNamespace

    from lm import LMConfig, Transformer
    from train.config import load_config
    from train.dpo import DPOJobConfig

    write_preference_data(tmp_path, pairs=6)
    pairs, _ = read_preferences([tmp_path / PREFERENCE_FILE], chat, max_tokens=129)
    args = [f"--run.dir={tmp_path}", "--model.init_from=a", *overrides]
    cfg = load_config(DPOJobConfig, "configs/posttrain/dpo_tiny.toml", args)
    ctx = SimpleNamespace(
        rank=0, dp_rank=0, dp_size=1, device=torch.device("cpu"), dims=SimpleNamespace(cp=1),
        micro_batch_size=lambda cfg: micro,
    )  # fmt: skip
    data = PreferenceBatches(pairs, seq_len=128, batch_size=4, dp_rank=0, dp_size=1, grad_accum=1, seed=0)
    torch.manual_seed(0)
    model = Transformer(LMConfig.from_preset("debug", dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    model.init_weights()
    return cfg, ctx, data, model


def test_the_stored_reference_is_read_back_for_the_same_pairs_and_weights_only(tmp_path, chat):
    """A resume in the same run dir reads the stored reference (whatever the model's weights are by then); other
    pairs or other initial weights recompute it."""
    from train.dpo import reference_logps

    cfg, ctx, data, model = _reference_case(tmp_path, chat, 4)
    first = reference_logps(model, cfg, ctx, {"train": data})["train"]
    assert first.shape == (len(data.pairs), 2) and (first < 0).all()
    model.init_weights()  # other weights: as a resumed run's model after its checkpoint loads
    assert torch.equal(reference_logps(model, cfg, ctx, {"train": data})["train"], first)
    cfg.model.init_from = "b"
    assert not torch.equal(reference_logps(model, cfg, ctx, {"train": data})["train"], first)


def test_a_short_run_scores_the_reference_of_the_pairs_it_reaches_only(tmp_path, chat):
    """Before step 1 only the pairs of the run's ``train.steps`` batches are scored, each as the full pass scores it;
    more steps on a resume score only the pairs added (the stored ones are read back)."""
    from train.dpo import reference_logps, score_pairs

    cfg, ctx, data, model = _reference_case(tmp_path, chat, 3, "--train.steps=1")
    full = score_pairs(model, cfg, ctx, data, 3)
    first = reference_logps(model, cfg, ctx, {"train": data})["train"]
    reached = sorted(data.global_indices(0))
    assert [i for i in range(len(data.pairs)) if not first[i].isnan().any()] == reached
    assert torch.allclose(first[reached], full[reached], atol=1e-5)
    model.init_weights(seed=1)  # other weights: whatever is scored now differs from the initial model's figures
    cfg.train.steps = 2
    second = reference_logps(model, cfg, ctx, {"train": data})["train"]
    assert not second.isnan().any()
    assert torch.equal(second[reached], first[reached])
    added = [i for i in range(len(data.pairs)) if i not in reached]
    assert not torch.allclose(second[added], full[added], atol=1e-3)
