"""The reward model's training, `train/reward.py`: the edited > chosen > rejected ranking's pairs and loss, a short
run that ranks held-out pairs right, 2-rank FSDP losses equal to one rank's, an exact resume, a trunk loaded
strictly, TP refused, and the export scored as transformers' LlamaForSequenceClassification scores it."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from data.preference import read_preferences
from lm.tokenizer import ChatFormat, Tokenizer
from tests.dist_utils import torchrun
from train.metrics import read_metrics
from train.posttrain.losses import ranking_reward_loss

ROW = {"prompt": "What is 2 + 3?", "chosen": "It is 5.", "rejected": "It is 6."}


@pytest.fixture(scope="module")
def chat():
    return ChatFormat(Tokenizer())


def test_an_edited_row_gives_its_three_ordered_pairs_and_the_loss_is_the_ranking_loss(tmp_path, chat):
    """Rows with and without an edited answer: the micro-batch's (better, worse) rows are every ordered pair of each
    ranking, each row's length ends at its answer's <|eot_id|>, and the loss over ``pair_scale`` is
    ``ranking_reward_loss``'s mean over the pairs (rewards [rows, 3] with the missing edited answer marked absent)."""
    from train.reward import RankingBatches, pair_figures

    rows = [{**ROW, "edited": "5."}, ROW, {**ROW, "prompt": "And 4 + 4?", "edited": "8", "chosen": "Eight."}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = read_preferences([path], chat, max_tokens=64)
    data = RankingBatches(pairs, seq_len=64, batch_size=3, dp_rank=0, dp_size=1, grad_accum=1, seed=0)
    batch = data.rows([0, 1, 2])
    answers = [chat.tokenizer.decode(row[: n].tolist()).rsplit("\n\n", 1)[-1]
               for row, n in zip(batch["tokens"], batch["lengths"], strict=True)]  # fmt: skip
    assert answers == [f"{a}<|eot_id|>" for a in ("5.", "It is 5.", "It is 6.", "It is 5.", "It is 6.", "8",
                                                   "Eight.", "It is 6.")]  # fmt: skip
    ordered = list(zip(batch["better"].tolist(), batch["worse"].tolist(), strict=True))
    assert ordered == [(0, 1), (0, 2), (1, 2), (3, 4), (5, 6), (5, 7), (6, 7)]
    assert batch["owner"].tolist() == [0, 0, 0, 1, 2, 2, 2]

    data.load_state_dict({"steps_taken": 0, "seed": 0})
    step = next(data)
    assert step["pair_scale"].item() == 7  # the global batch's ordered pairs (one rank, one micro-batch)
    rewards = torch.randn(8, dtype=torch.float64)
    loss, right, margin = pair_figures(rewards, batch)
    ranked = torch.tensor([[rewards[0], rewards[1], rewards[2]], [0.0, rewards[3], rewards[4]],
                           [rewards[5], rewards[6], rewards[7]]], dtype=torch.float64)  # fmt: skip
    present = torch.tensor([[True, True, True], [False, True, True], [True, True, True]])
    torch.testing.assert_close(loss / 7, ranking_reward_loss(ranked, present), rtol=1e-12, atol=0)
    want_right = sum(float(rewards[b] > rewards[w]) for b, w in ordered)
    assert right.item() == pytest.approx(want_right) and margin.item() == pytest.approx(
        sum((rewards[b] - rewards[w]).item() for b, w in ordered)
    )


# ---------------------------------------------------------------- torchrun train/reward.py

# A preference that a 2-layer random LM learns in a few steps and that holds on prompts it never saw: the embedded
# pairs differ in a fact the model would have to compute (a count, a sum, which shape is red), which a randomly
# initialised LM does not learn in a short run (tried: 75 steps of 16 pairs, held-out accuracy 0.49-0.51).
GOOD, BAD = ("fine", "great", "lovely", "useful", "bright", "kind"), ("awful", "broken", "ugly", "dull", "cruel")
TOPICS = "apple river stone cloud chair garden window bottle forest violin candle mirror ladder pillow rocket tiger"


def _lexical_rows(count, seed, topics, edited_every=0):
    """Rows preferring a kind word about the topic; every ``edited_every``-th has an edited answer above it."""
    rng = random.Random(seed)
    rows = []
    for k in range(count):
        topic = rng.choice(topics)
        row = {"prompt": f"What do you think of the {topic}?", "chosen": f"The {topic} is {rng.choice(GOOD)}.",
               "rejected": f"The {topic} is {rng.choice(BAD)}."}  # fmt: skip
        if edited_every and k % edited_every == 0:
            row["edited"] = f"The {topic} is truly {rng.choice(GOOD)}."
        rows.append(row)
    return rows


STEPS, SAVED, SHORT = 16, 12, 4


@pytest.fixture(scope="module")
def rm_setup(tmp_path_factory):
    """A tiny Llama 3 LM (full vocabulary) as init_from; 64 training rows (a third with an edited answer) and 32
    held-out pairs on topics none of them has."""
    from lm import LMConfig, Transformer, save_pretrained

    root = tmp_path_factory.mktemp("reward")
    topics = TOPICS.split()
    for name, rows in (
        ("train.jsonl", _lexical_rows(64, 0, topics[:12], 3)),
        ("held.jsonl", _lexical_rows(32, 1, topics[12:])),
    ):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    model = Transformer(LMConfig.from_preset("debug", dim=64, n_layers=2, n_heads=4, n_kv_heads=2))
    model.init_weights()
    save_pretrained(model, root / "init", format="hf")
    yield root
    shutil.rmtree(root, ignore_errors=True)  # its checkpoints of the 128K-vocabulary LM: freed after the module


def _reward(root, run_dir, nproc, *extra, check=True):
    argv = [
        "--config", "configs/posttrain/reward_tiny.toml",
        f"--run.dir={run_dir}",
        f"--data.files={root / 'train.jsonl'}",
        "--data.seq_len=64",
        f"--model.init_from={root / 'init'}",
        "--train.batch_size=8",
        f"--train.steps={STEPS}",
        f"--train.eval_interval={SHORT}",
        "--optim.lr=3e-3",
        "--optim.warmup_steps=2",
        f"--optim.schedule_steps={STEPS}",
        "--metrics.log_interval=1",
        "--checkpoint.enable=false",
        f"--eval.pairs_file={root / 'held.jsonl'}",
        *extra,
    ]  # fmt: skip
    proc = torchrun("train/reward.py", nproc, argv, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir))}


@pytest.fixture(scope="module")
def one_rank(rm_setup):
    """One rank, checkpointed near the end."""
    run_dir = rm_setup / "rm1"
    _reward(rm_setup, run_dir, 1, "--checkpoint.enable=true", f"--checkpoint.interval={SAVED}")
    return run_dir


def test_a_short_run_ranks_held_out_pairs_right(one_rank):
    """The head starts at zero (every reward 0: loss log 2, ties counted half); 16 steps later the reward model
    ranks nearly every held-out pair right, on topics it never saw."""
    records = {r["step"]: r for r in read_metrics(str(one_rank))}
    assert sorted(records) == list(range(1, STEPS + 1))
    assert records[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[1]["rewards/pairwise_accuracy"] == 0.5 and records[1]["rewards/margin"] == 0
    assert records[STEPS]["eval/pairwise_accuracy"] >= 0.9 and records[STEPS]["eval/margin"] > 0.1, records[STEPS]
    assert records[STEPS]["loss"] < records[1]["loss"] - 0.2


def test_two_rank_fsdp_matches_one_rank(rm_setup, one_rank):
    """FSDP with gradient accumulation gives one rank's losses step by step (the first steps of the same schedule),
    and the same held-out figures."""
    records = {r["step"]: r for r in read_metrics(str(one_rank))}
    _reward(rm_setup, rm_setup / "rm2", 2, "--train.grad_accum=2", f"--train.steps={SHORT}")
    got = {r["step"]: r for r in read_metrics(str(rm_setup / "rm2"))}
    assert sorted(got) == list(range(1, SHORT + 1))
    for step in got:
        assert got[step]["loss"] == pytest.approx(records[step]["loss"], rel=1e-5), step
    for key in ("eval/pairwise_accuracy", "eval/margin"):
        assert got[SHORT][key] == pytest.approx(records[SHORT][key], rel=1e-4, abs=1e-6), key


def test_resumed_onto_two_ranks_continues_exactly(rm_setup, one_rank):
    """Saved by one rank halfway, resumed by two in a fresh run dir: weights, optimizer and data position carry."""
    checkpoint = one_rank / "checkpoints" / f"step-{SAVED}"
    _reward(rm_setup, rm_setup / "rm_resumed", 2, f"--checkpoint.resume={checkpoint}")
    want, got = _losses(one_rank), _losses(rm_setup / "rm_resumed")
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


def test_the_export_scores_as_transformers_sequence_classification(rm_setup, one_rank, chat, tmp_path):
    """``train.export`` writes the trained reward model as HF's LlamaForSequenceClassification: its scores at each
    answer's end equal ours (``lm.reward.score_sequences`` on ``load_pretrained``), and the head has trained."""
    from transformers import LlamaForSequenceClassification

    from lm import load_pretrained
    from lm.reward import score_sequences
    from train.export import main as export_main

    assert export_main([str(one_rank), "--out", str(tmp_path / "hf")]) == 0
    ours_model = load_pretrained(tmp_path / "hf")
    assert ours_model.config.num_labels == 1 and ours_model.output.weight.abs().sum() > 0
    pairs, _ = read_preferences([rm_setup / "held.jsonl"], chat, max_tokens=128)
    rows = [d.ids for p in pairs[:3] for d in (p.chosen, p.rejected)]
    ours = score_sequences(ours_model, rows, batch_size=4)
    hf = LlamaForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = torch.stack([hf(torch.tensor([row])).logits[0, 0] for row in rows])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_a_missing_trunk_weight_is_an_error_naming_it_and_tensor_parallel_is_refused(rm_setup, tmp_path):
    """Only the LM's output projection gives way to the head: any trunk weight missing stops the run naming it."""
    (tmp_path / "init").mkdir()
    for file in (rm_setup / "init").iterdir():
        if file.suffix == ".safetensors":
            state = load_file(file)
            del state["model.layers.1.mlp.down_proj.weight"]
            save_file(state, tmp_path / "init" / file.name, metadata={"format": "pt"})
        else:
            (tmp_path / "init" / file.name).write_bytes(file.read_bytes())
    proc = _reward(rm_setup, tmp_path / "broken", 1, f"--model.init_from={tmp_path / 'init'}", check=False)
    assert proc.returncode != 0 and "layers.1.feed_forward.w2.weight" in proc.stderr, proc.stderr[-3000:]
    from train.config import load_config
    from train.parallel.tp import TensorParallelError
    from train.reward import RewardJobConfig, validate

    cfg = load_config(RewardJobConfig, "configs/posttrain/reward_tiny.toml", [f"--model.init_from={rm_setup / 'init'}"])
    assert validate(cfg, world_size=2).num_labels == 1
    cfg.parallel.tp = 2
    with pytest.raises(TensorParallelError, match="num_labels=1"):
        validate(cfg, world_size=2)


@pytest.mark.parametrize(("size", "world"), [("8b", 64), ("70b", 256), ("405b", 512)])
def test_cluster_configs_validate_for_their_gpus(tmp_path, size, world):
    """Each paper-size config resolves on the GPU count its header names (a checkpoint of that shape as init_from):
    a head of one score on the checkpoint's trunk, the batch split evenly, and a TP override refused."""
    from lm import LMConfig
    from train.config import load_config
    from train.parallel.tp import TensorParallelError
    from train.reward import RewardJobConfig, validate

    preset = LMConfig.from_preset(f"llama3-{size}")
    (tmp_path / "config.json").write_text(json.dumps(preset.to_hf_config()))
    (tmp_path / "model.safetensors").touch()  # validate reads the config only
    path = f"configs/posttrain/reward_llama3_{size}.toml"
    cfg = load_config(RewardJobConfig, path, [f"--model.init_from={tmp_path}"])
    config = validate(cfg, world_size=world)
    assert (config.num_labels, config.n_layers, config.dim) == (1, preset.n_layers, preset.dim)
    assert cfg.train.batch_size == 512 and cfg.parallel.param_dtype == "bfloat16"
    cfg.parallel.tp = 8
    with pytest.raises(TensorParallelError, match="num_labels=1"):
        validate(cfg, world_size=world)


def test_an_lm_gets_a_zero_head_and_a_reward_model_loads_whole(rm_setup, tmp_path):
    """``fresh_head`` (the load's adapt_state) swaps only an LM's output projection for a zero head; a reward
    model's checkpoint keeps its own head, and its config passes validation as it is (training continues)."""
    from lm import LMConfig, Transformer, save_pretrained
    from lm.checkpoint import read_state_dict
    from train.config import load_config
    from train.reward import RewardJobConfig, fresh_head, validate

    config, state = read_state_dict(rm_setup / "init")
    adapted = fresh_head(config, state)
    assert adapted["output.weight"].shape == (1, config.dim) and not adapted["output.weight"].any()
    assert all(adapted[k] is v for k, v in state.items() if k != "output.weight")
    torch.manual_seed(1)
    rm = Transformer(LMConfig.from_preset("debug", dim=64, n_layers=1, n_heads=4, n_kv_heads=2, num_labels=1))
    rm.init_weights()
    save_pretrained(rm, tmp_path / "rm", format="hf")
    config, state = read_state_dict(tmp_path / "rm")
    assert torch.equal(fresh_head(config, state)["output.weight"], rm.output.weight.detach())
    cfg = load_config(RewardJobConfig, "configs/posttrain/reward_tiny.toml", [f"--model.init_from={tmp_path / 'rm'}"])
    assert validate(cfg, world_size=1).num_labels == 1
