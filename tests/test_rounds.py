"""`python -m train.rounds`: one round of the paper's post-training (reward model, rejection sampling, SFT, DPO,
policy) runs end to end from a small random LM, each stage feeding the next; a rerun skips every finished stage and
redoes only what is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from lm import LMConfig, Transformer, load_pretrained, save_pretrained
from tests.dist_utils import PYTHON, ROOT
from train.metrics import read_metrics

TINY = {
    "sft": ["--train.steps=2", "--train.batch_size=2", "--data.seq_len=128", "--eval.samples=2"],
    "reward": ["--train.steps=2", "--train.batch_size=2", "--eval.pairs=4"],
    "rejection": [
        "--data.limit=3",
        "--sampling.samples=2",
        "--sampling.max_new_tokens=6",
        "--sampling.batch_size=6",
        "--sampling.require_stop=false",
    ],
    "dpo": ["--train.steps=2", "--train.batch_size=2", "--eval.samples=2", "--eval.pairs=2"],
}
COMMON = ["--train.eval_interval=2", "--checkpoint.interval=2", "--metrics.log_interval=1", "--eval.max_new_tokens=4"]


def _config(root, base) -> str:
    lines = [
        "[pipeline]",
        f'dir = "{root / "rounds"}"',
        f'base = "{base}"',
        f'data_dir = "{root / "data"}"',
        "nproc_per_node = 1",
        "heldout_samples = 2",
        "further_heldout = 3",
        "collect_prompts = 3",
    ]
    for stage, overrides in TINY.items():
        extra = overrides + (COMMON if stage != "rejection" else [])
        if stage == "reward":
            extra = [o for o in extra if not o.startswith("--eval.max_new_tokens")]
        lines += [f"[{stage}]", f"overrides = {json.dumps(extra)}"]
    path = root / "rounds.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _rounds(config: str, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [PYTHON, "-m", "train.rounds", "--config", config, *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    model = Transformer(LMConfig.from_preset("debug", dim=64, n_layers=2, n_heads=4, n_kv_heads=2))
    model.init_weights(seed=0)
    save_pretrained(model, root / "base", format="hf")
    config = _config(root, root / "base")
    yield root, config, _rounds(config)
    shutil.rmtree(root, ignore_errors=True)  # its stages' checkpoints of the 128K-vocabulary LM: freed after the module


def test_one_round_runs_every_stage_and_leaves_a_chat_model(pipeline):
    root, _, proc = pipeline
    out = root / "rounds"
    round1 = out / "round1"
    # Each stage's output is the next one's input: the policy's graded pairs (collected on the last 3 prompts, apart
    # from the 3 rejection sampling takes) go to the reward model.
    collected = [json.loads(line) for line in (round1 / "preferences" / "samples.jsonl").read_text().splitlines()]
    total = len((root / "data" / "train.jsonl").read_text().splitlines())
    assert [r["index"] for r in collected] == [total - 3, total - 2, total - 1]
    assert all(r["chosen"] is None for r in collected)
    assert str(round1 / "preferences" / "preference.jsonl") in (round1 / "reward" / "config.toml").read_text()
    assert load_pretrained(round1 / "reward" / "hf").config.num_labels == 1
    samples = [json.loads(line) for line in (round1 / "rejection" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(len(row["samples"]) == 2 for row in samples)
    sft_config = (round1 / "sft" / "config.toml").read_text()
    assert str(round1 / "rejection" / "sft.jsonl") in sft_config and str(root / "base") in sft_config
    dpo_config = (round1 / "dpo_seed0" / "config.toml").read_text()
    assert str(round1 / "sft" / "hf") in dpo_config
    # DPO trains on the round's own pairs of the policy's answers; on the embedded pairs only when there are none.
    own = [round1 / stage / "preference.jsonl" for stage in ("preferences", "rejection")]
    own = [path for path in own if path.stat().st_size]
    assert all(str(path) in dpo_config for path in own)
    assert (str(root / "data" / "preference.jsonl") in dpo_config) == (not own)
    policy = load_pretrained(round1 / "policy")
    assert policy.config.num_labels == 0
    # The summary names every stage beside the base LM, with held-out figures from each run.
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary)[:2] == ["base LM", "bootstrap SFT"]
    assert "accuracy" in summary["base LM"] and "accuracy" in summary["round 1 SFT"]
    # Every stage's model is graded on the further held-out prompts too, the base LM's included (one DPO seed: the
    # policy is its copy, graded once).
    graded = [stage for stage, figures in summary.items() if "further/accuracy" in figures]
    assert graded == ["base LM", "bootstrap SFT", "round 1 SFT", "round 1 DPO (seed 0)"]
    assert "on the further held-out prompts" in proc.stdout
    assert "pairwise_accuracy" in summary["round 1 reward model"]
    assert summary["round 1 rejection sampling"]["prompts"] == 3
    assert "demo --checkpoint" in proc.stdout and str(round1 / "policy") in proc.stdout


def test_a_rerun_redoes_only_what_is_missing_and_a_second_round_builds_on_the_first(pipeline):
    root, config, _ = pipeline
    round1, round2 = root / "rounds" / "round1", root / "rounds" / "round2"
    sft_steps = [r["step"] for r in read_metrics(str(round1 / "sft"))]
    policy = (round1 / "policy" / "model.safetensors").read_bytes()
    for gone in ("policy", "dpo_seed0/hf"):
        subprocess.run(["rm", "-rf", str(round1 / gone)], check=True)
    # Round 2's SFT goes on from round 1's policy (pipeline.sft_init), where round 1's started from the base LM.
    log = _rounds(config, "--pipeline.rounds=2", "--pipeline.sft_init=policy").stderr
    stages = ("bootstrap SFT", "round 1 preference collection", "round 1 reward model", "round 1 rejection sampling")
    for stage in (*stages, "round 1 SFT"):
        assert f"{stage}: done" in log, log[-3000:]
    assert "round 1 DPO (seed 0): finished" in log and "round 1 policy: finished" in log
    assert [r["step"] for r in read_metrics(str(round1 / "sft"))] == sft_steps
    # The DPO run had finished: its checkpoint is exported again, giving the same policy.
    assert (round1 / "policy" / "model.safetensors").read_bytes() == policy
    # Round 2 samples round 1's policy and trains on round 1's samples and pairs as well as its own.
    assert str(round1 / "policy") in (round2 / "rejection" / "config.toml").read_text()
    sft_files = (round2 / "sft" / "config.toml").read_text()
    assert str(round1 / "rejection" / "sft.jsonl") in sft_files and str(round2 / "rejection" / "sft.jsonl") in sft_files
    assert f'init_from = "{round1 / "policy"}"' in sft_files
    assert f'init_from = "{root / "base"}"' in (round1 / "sft" / "config.toml").read_text()
    reward_files = (round2 / "reward" / "config.toml").read_text()
    assert str(round1 / "rejection" / "preference.jsonl") in reward_files
    assert str(round1 / "preferences" / "preference.jsonl") in reward_files
    assert str(round2 / "preferences" / "preference.jsonl") in reward_files
    assert load_pretrained(round2 / "policy").config.num_labels == 0


@pytest.mark.parametrize("key, value", [("reward_init", "random"), ("sft_init", "pretrained"), ("dpo_pairs", "newest")])
def test_an_unknown_choice_is_an_error_naming_its_key_and_value(key, value, capsys):
    from train.rounds import main

    config = os.path.join(ROOT, "configs", "posttrain", "rounds_tiny.toml")
    with pytest.raises(SystemExit) as stopped:
        main(["--config", config, f"--pipeline.{key}={value}"])
    assert stopped.value.code == 2
    assert f"pipeline.{key}='{value}'" in capsys.readouterr().err


def test_a_stored_grading_is_read_back_only_for_the_same_checkpoint_files_and_prompts(tmp_path, monkeypatch):
    import lm
    import train.posttrain.heldout as heldout
    from train.rounds import graded_checkpoint

    graded = []  # the prompts of each real grading (the model is never loaded: its figures are the prompt count)
    monkeypatch.setattr(lm, "load_pretrained", lambda path: path)
    monkeypatch.setattr(
        heldout, "graded_accuracy", lambda model, chat, rows, **_: graded.append(rows) or {"eval/accuracy": len(rows)}
    )
    checkpoint, stored = tmp_path / "policy", tmp_path / "policy_eval.json"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights of the first run")
    rows = [{"messages": [{"role": "user", "content": f"What is {n} + 1?"}], "answer": str(n + 1)} for n in range(3)]
    assert graded_checkpoint(checkpoint, stored, rows) == {"accuracy": 3}
    assert graded_checkpoint(checkpoint, stored, rows) == {"accuracy": 3} and len(graded) == 1  # read back
    assert graded_checkpoint(checkpoint, stored, rows[:2]) == {"accuracy": 2}  # other prompts: graded again
    (checkpoint / "model.safetensors").write_bytes(b"weights of a retrained run")
    assert graded_checkpoint(checkpoint, stored, rows[:2]) == {"accuracy": 2} and len(graded) == 3  # retrained
    stored.write_text(json.dumps({"accuracy": 0.5}))  # a file from before the key: graded again, not trusted
    assert graded_checkpoint(checkpoint, stored, rows[:2]) == {"accuracy": 2} and len(graded) == 4
    assert graded_checkpoint(checkpoint, stored, []) == {} and len(graded) == 4
