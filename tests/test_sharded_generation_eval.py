"""``eval.generate_sharded``: every rank generates for its share of the held-out samples with the FSDP-sharded model
itself and the export gathers what it writes, so no rank holds an unsharded copy of the model.

In process on 2 gloo ranks (tiny random models of every stage, fp32): the sharded model's greedy answers, batched
with ragged prompts left-padded and rows stopping at different steps on the two ranks, equal the unsharded model's
``generate`` one sample at a time, and the gathered tensors equal its weights. Through ``train/adapter.py`` (a
2-rank vision stage on a tiny random LM): the held-out metrics, the greedy answers and RUN_DIR/final (which loads
with ``Llama3MM.from_pretrained``) equal the option-off run's. The 70B vision plan with the option fits 8 x 80 GiB.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import write_tiny_stage_models
from dist_utils import each_modality_on_two_ranks, torchrun

from train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")  # the in-process checks plan on the meta device

SCRIPT = "train/adapter.py"
STEPS = 2
MAX_NEW = 6
GIB = 2**30
COMMON = (
    f"--train.steps={STEPS}",
    "--train.batch_size=4",
    "--train.eval_interval=1",  # a step trains after an evaluation, and the export follows one
    f"--checkpoint.interval={STEPS}",
    "--metrics.log_interval=1",
    # Five samples on two ranks: shares of three, one of them a pad; batches of two, so two batches a rank.
    "--eval.samples=5",
    "--eval.batch_size=2",
    "--eval.max_new_tokens=4",
    "--eval.loss_samples=2",
    "--model.vision_layers=2",
)
SHARDED = "--eval.generate_sharded=true"
COPY = "--eval.generate_sharded=false"  # the tiny config sets the option: off is said explicitly


def test_padded_share_gives_every_rank_as_many_samples_and_each_sample_once():
    """Contiguous shares in rank order, padded with sample 0; the real ones cover every sample once."""
    from train.sharded_generation import padded_share

    for total, ranks in ((5, 2), (2, 4), (8, 8), (0, 3), (7, 3)):
        shares = [padded_share(total, r, ranks) for r in range(ranks)]
        assert len({len(indices) for indices, _ in shares}) == 1
        assert [i for indices, real in shares for i in indices[:real]] == list(range(total))
        assert all(i == 0 for indices, real in shares for i in indices[real:])
    assert padded_share(5, 1, 2) == ([3, 4, 0], 2)


# ----------------------------------------------------------------------------------------------------------------
# In process: the sharded model's answers and gathered weights equal the unsharded model's.


def prompts(modality: str, mm) -> list[tuple[list[int], dict]]:
    """Five prompts (token ids: the random LM answers its text more than its media) with their media; the speech
    clips differ in length, so the speech prompts do too."""
    from test_adapter_fsdp import TILE

    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(5):
        text = [10 + 7 * k, 11 + 13 * k]
        if modality == "vision":
            image = torch.randint(0, 256, (3, TILE, TILE), dtype=torch.uint8, generator=g)
            out.append(([1, mm.image_token_id, *text], {"images": [image]}))
        elif modality == "video":
            clip = torch.randint(0, 256, (6, 3, TILE, TILE), dtype=torch.uint8, generator=g)
            out.append(([1, *text], {"video": clip}))
        else:
            audio = 0.1 * torch.randn(1600 + 800 * k, generator=g)
            out.append(([1, mm.audio_token_id, *text], {"audio": audio}))
    return out


def reference_answers(mm, samples, stops: tuple[int, ...]) -> list[list[int]]:
    """``Llama3MM.generate``'s greedy ids, one sample at a time (what rank 0's copy generates)."""
    return [
        list(mm.generate_tokens(ids, max_new_tokens=MAX_NEW, temperature=0.0, stop_tokens=stops, **media))
        for ids, media in samples
    ]


def stop_token(answers: list[list[int]], rank0: list[int]) -> int:
    """A token of sample 0's answer that no answer of rank 1's share holds: rank 0 stops a row early, rank 1 not."""
    others = {t for k, a in enumerate(answers) if k not in rank0 for t in a}
    return next((t for t in answers[0][1:] if t not in others), answers[0][1])


def sharded_generation(modality: str, rank: int, mesh) -> dict:
    """The stage's tiny model sharded as train/adapter.py shards it (frozen parts too): its answers to its share of
    five prompts in batches of two, gathered, beside the unsharded copy's; and its gathered tensors."""
    from test_adapter_fsdp import CASES

    from train.adapter import AdapterJobConfig, collate_media, export_layout, frozen_units, fsdp_blocks
    from train.sharded_generation import gather_answers, gathered_tensors, greedy_ids, padded_share
    from train.stage import shard

    torch.manual_seed(0)  # the same model on every rank
    mm, _ = CASES[modality]()
    samples = prompts(modality, mm)
    share, real = padded_share(len(samples), rank, 2)
    stops = (stop_token(reference_answers(mm, samples, ()), padded_share(5, 0, 2)[0]),)
    want = reference_answers(mm, samples, stops)
    mm._tokenizer = SimpleNamespace(stop_tokens=stops)
    reference, layout = copy.deepcopy(mm), export_layout(mm)
    stage = SimpleNamespace(model=mm, blocks=fsdp_blocks(mm), frozen_units=frozen_units(mm))
    stage.frozen = {p for p in mm.parameters() if not p.requires_grad}
    cfg = AdapterJobConfig()
    cfg.parallel.shard_frozen = True
    shard(cfg, SimpleNamespace(mesh=mesh), stage)
    got = []
    for i in range(0, len(share), 2):
        inputs = [mm.processor.prompt_inputs(samples[j][0], device="cpu", **samples[j][1]) for j in share[i : i + 2]]
        rows = [x.pop("tokens")[0].tolist() for x in inputs]
        got += greedy_ids(mm, rows, collate_media(inputs), MAX_NEW, torch.device("cpu"))
    answers = gather_answers([json.dumps(a) for a in got[:real]])
    tensors = gathered_tensors(mm, layout.shapes)
    if rank != 0:
        return {}
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("lm.")}
    return {
        "want": want,
        "got": [json.loads(a) for a in answers],
        "widths": sorted({len(mm.processor.prompt_inputs(ids, device="cpu", **m)["tokens"][0]) for ids, m in samples}),
        "same_keys": sorted(tensors) == sorted(state),
        "mismatched": [k for k, v in state.items() if k in tensors and not torch.equal(tensors[k], v)],
    }


def test_sharded_model_answers_and_gathers_as_the_unsharded_one(tmp_path):
    """Vision, video and speech (ragged prompts) on 2 ranks, every frozen part sharded: the batched answers of the
    sharded model equal the unsharded model's one at a time, with rows that stop early on rank 0 while rank 1 decodes
    on; the tensors the export gathers equal the unsharded model's, bit for bit."""
    results = each_modality_on_two_ranks(sharded_generation, tmp_path)[0]
    for modality, r in results.items():
        assert r["got"] == r["want"], modality
        lengths = [len(a) for a in r["want"]]
        assert min(lengths) < MAX_NEW == max(lengths[3:]), (modality, lengths)  # rank 0 stops a row, rank 1 runs on
        assert r["same_keys"] and not r["mismatched"], (modality, r["mismatched"])
    assert len(results["speech"]["widths"]) > 1  # the speech prompts are ragged: left-padded in their batches


# ----------------------------------------------------------------------------------------------------------------
# Through train/adapter.py: the option on and off.


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny scenes, a tiny random LM in HF layout (the Llama 3 vocabulary the processor needs), a tiny ViT."""
    from data.synthetic import generate

    root = tmp_path_factory.mktemp("sharded_generation")
    generate("images", root / "media", train=16, heldout=8)
    write_tiny_stage_models(root)
    return root


def run(run_dir: Path, assets: Path, data: Path, *extra: str) -> tuple[list[dict], str]:
    """The 2-rank vision stage on ``data``; its records and its output (rank 0 logs the held-out generations)."""
    argv = ["--modality", "vision", "--config", "configs/adapter/vision_tiny.toml", f"--run.dir={run_dir}"]
    argv += [f"--data.dir={data}", "--data.generate=false", f"--model.lm={assets / 'lm'}"]
    argv += [f"--model.vision_encoder={assets / 'vision_encoder'}"]
    proc = torchrun(SCRIPT, 2, [*argv, *COMMON, *extra], timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return read_metrics(str(run_dir)), proc.stdout + proc.stderr


def runs(assets: Path, tmp_path: Path, data: Path, *extra: str) -> dict[str, tuple[Path, list[dict], str]]:
    """The stage with the option off (rank 0's copy) and on: {name: (run dir, records, output)}."""
    out = {}
    for name, option in (("copy", (COPY,)), ("sharded", (SHARDED,))):
        out[name] = (tmp_path / name, *run(tmp_path / name, assets, data, *extra, *option))
    return out


def generations(output: str) -> list[str]:
    """Rank 0's logged greedy answers to the held-out images (the first three, beside their captions)."""
    return re.findall(r"held-out generations: (.*)", output)


def assert_same_runs(runs: dict[str, tuple[Path, list[dict], str]], keys: tuple[str, ...]) -> None:
    """Option off and on alike: every step's ``keys``, rank 0's logged answers, and RUN_DIR/final (every file,
    every tensor bit for bit, the manifest), which loads with from_pretrained."""
    from test_frozen_lm_sharding import assert_same_final, final_state

    from llama3mm import Llama3MM

    (copy_dir, copy_records, copy_out), (sharded_dir, sharded_records, sharded_out) = runs["copy"], runs["sharded"]
    assert [r["step"] for r in sharded_records] == [r["step"] for r in copy_records] == list(range(1, STEPS + 1))
    for got, want in zip(sharded_records, copy_records, strict=True):
        for key in ("loss", "grad_norm", *keys):
            assert got[key] == want[key], (got["step"], key)
    assert generations(sharded_out) == generations(copy_out) and generations(copy_out)
    assert_same_final(sharded_dir, copy_dir)
    got, want = final_state(sharded_dir), final_state(copy_dir)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    loaded = Llama3MM.from_pretrained(sharded_dir / "final", device="cpu")
    reference = Llama3MM.from_pretrained(copy_dir / "final", device="cpu")
    assert loaded.prompts == reference.prompts and loaded.prompts
    for (name, p), (_, q) in zip(loaded.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


def test_sharded_generation_gives_the_copys_metrics_answers_and_final(assets, tmp_path):
    """The embedded scenes, the frozen LM sharded (the 70B's layout): option off and on give every step's loss and
    evaluation (held-out loss, accuracy, exact match, chance; a step trains after an evaluation), rank 0's logged
    answers and RUN_DIR/final alike."""
    pair = runs(assets, tmp_path, assets / "media", "--parallel.shard_frozen=true")
    assert_same_runs(pair, ("eval/loss", "eval/accuracy", "eval/exact_match", "eval/chance"))


def test_sharded_generation_on_other_data_with_the_lm_replicated(assets, tmp_path):
    """Other data (the scenes without their manifest: caption metrics of every answer, the shuffled-media control)
    and the frozen LM replicated: option off and on alike."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(assets / "media" / "images", other, ignore=shutil.ignore_patterns("*.json"))
    pair = runs(assets, tmp_path, other, "--parallel.shard_frozen=false")
    assert_same_runs(pair, ("eval/loss", "eval/loss_shuffled_media", "eval/bleu4", "eval/wer"))


# ----------------------------------------------------------------------------------------------------------------
# The dry run.


def test_70b_vision_plan_with_sharded_generation_fits_8_ranks(tmp_path, capsys):
    """configs/adapter/vision_llama3_70b.toml (frozen LM sharded, sharded generation, micro-batch 2): rank 0 holds no
    evaluation copy and every rank fits 80 GiB, as the command's verdict says; with the copy rank 0 would not."""
    from train.adapter import AdapterJobConfig, main, plan
    from train.config import load_config

    cfg = load_config(AdapterJobConfig, "configs/adapter/vision_llama3_70b.toml", [])
    assert cfg.eval.generate_sharded and cfg.parallel.shard_frozen and cfg.train.grad_accum == 1024
    reports = {}
    for rank in (0, 1, 7):
        out = tmp_path / f"rank{rank}.json"
        argv = ["--modality", "vision", "--config", "configs/adapter/vision_llama3_70b.toml", "--dry-run"]
        main([*argv, "--world-size=8", f"--dry-run-rank={rank}", f"--dry-run-out={out}"])
        report = reports[rank] = json.loads(out.read_text())
        assert report["fits"] and report["total_bytes"] <= 80 * GIB and report["eval_copy_bytes"] == 0, rank
        assert report["micro_batch"] == 2
        # What generating holds (a batch's KV caches) stays below the step's activations, which it replaces.
        assert 0 < report["eval_generation_bytes"] < sum(report["activations"].values())
        need = report["worst_total_gb"]
        assert f"FITS: the fullest rank ({rank}) needs {need:.2f} of 80 GiB" in capsys.readouterr().out
    # With rank 0's copy instead (the option off), nothing else changes, and rank 0 does not fit.
    overrides = [COPY]
    with_copy = plan(load_config(AdapterJobConfig, "configs/adapter/vision_llama3_70b.toml", overrides), "vision", 8)
    assert not with_copy["fits"] and with_copy["eval_copy_bytes"] > 190 * GIB
    assert with_copy["total_bytes"] - with_copy["eval_copy_bytes"] == reports[0]["total_bytes"]
