"""train.scaling: the plan's arithmetic and time check, the emitted cluster files, and a tiny CPU grid end to end."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import replace

import pytest
import tomllib

from train import scaling
from train.config import load_config
from train.lm import LMJobConfig, validate

# 2 budgets x 3 sizes of the smallest shapes: a few seconds in all.
TINY = replace(
    scaling.ScalingConfig(),
    budgets=[3e8, 3e9],
    shapes=[[8, 1], [16, 1], [24, 1], [32, 1]],
    sizes_per_budget=3,
    batch_size=8,
    heldout_windows=16,
    task_rows=12,
    lr=1e-2,
    lr_size_exponent=0.0,
    max_minutes=5.0,
)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    return out, scaling.run_grid(TINY, out, verbose=False)


def test_plan_tokens_times_flops_per_token_is_the_budget():
    cfg = scaling.ScalingConfig()
    runs = scaling.plan_grid(cfg)
    assert len(runs) == len(cfg.budgets) * cfg.sizes_per_budget
    for run in runs:
        fpt = scaling.lm_config(cfg, run.dim, run.n_layers).flops_per_token(cfg.seq_len)
        assert run.flops_per_token == fpt
        assert run.tokens % cfg.seq_len == 0
        # Whole sequences: within half a sequence's FLOPs of the budget.
        assert abs(run.tokens * fpt - run.budget) <= 0.5 * cfg.seq_len * fpt
        assert run.compute == pytest.approx(run.budget, rel=0.05)
    for budget in cfg.budgets:  # sizes around the optimum: distinct shapes, each budget its own
        assert len({(r.dim, r.n_layers) for r in runs if r.budget == budget}) == cfg.sizes_per_budget


def test_a_grid_over_max_minutes_is_refused(capsys):
    cfg = replace(scaling.ScalingConfig(), budgets=[1e14])
    with pytest.raises(ValueError, match="over --max-minutes 20"):
        scaling.check_time(scaling.plan_grid(cfg), cfg.max_minutes)
    with pytest.raises(SystemExit) as e:
        scaling.main(["plan", "--budgets", "1e14", "--max-minutes", "1"])
    assert e.value.code == 2
    assert "over --max-minutes 1" in capsys.readouterr().err
    scaling.main(["plan", "--budgets", "1e9", "--max-minutes", "1"])  # a small one passes
    assert "BYTE-LEVEL" in capsys.readouterr().out


def test_the_plan_is_timed_by_a_time_model_measured_on_this_machine(capsys):
    # The ladder's ends differ 460x in FLOPs per token: the two timings give a positive rate (and, unless load makes
    # the cheap shape's steps time too fast, an overhead; otherwise 0, the rate alone).
    cfg = replace(scaling.ScalingConfig(), budgets=[1e9])
    configs, costs = scaling.ladder(cfg)
    ends = [scaling.planned_run(cfg, 1e9, i, configs, costs) for i in (0, len(costs) - 1)]
    flops_per_s, overhead_s = scaling.measure_time_model(cfg, ends, seconds=0.3)
    assert 1e7 < flops_per_s < 1e15 and 0 <= overhead_s < 10
    scaling.main(["plan", "--budgets", "1e9", "1e10"])
    printed = capsys.readouterr().out
    assert "time model measured on this machine" in printed
    # The printed estimates are the measured model's, not the config's.
    measured = float(re.search(r"flops_per_s = ([0-9.e+-]+)", printed).group(1))
    assert measured != cfg.flops_per_s
    assert not scaling.gpu_config().measure_speed  # a cluster plan is not timed on this machine


def test_each_run_trains_at_its_size_s_learning_rate(tmp_path):
    cfg = replace(TINY, budgets=[3e8], lr_size_exponent=0.5, lr_reference_params=5_000.0)
    results = scaling.run_grid(cfg, tmp_path, verbose=False)
    assert len({r["params"] for r in results}) == 3
    for r in results:
        assert r["lr"] == pytest.approx(cfg.lr * (r["params"] / 5_000.0) ** -0.5)
        logged = [json.loads(line).get("lr") for line in (tmp_path / "runs" / r["name"] / "metrics.jsonl").open()]
        assert 0 < max(x for x in logged if x is not None) <= r["lr"] * (1 + 1e-6)
    run = scaling.plan_grid(cfg)[0]
    assert scaling.lm_job_config(cfg, run).optim.lr == pytest.approx(scaling.run_lr(cfg, run))  # --emit too
    with pytest.raises(ValueError, match="lr_size_exponent"):  # it changes what a run computes
        scaling.run_grid(replace(cfg, lr_size_exponent=0.0), tmp_path, verbose=False)


def test_emitted_configs_parse_and_sbatch_names_every_run(tmp_path):
    cfg = scaling.gpu_config()
    runs = scaling.plan_grid(cfg)
    scaling.emit(cfg, runs, tmp_path)
    script = (tmp_path / "scaling.sbatch").read_text()
    assert f"#SBATCH --array=0-{len(runs) - 1}" in script
    for run in runs:
        path = tmp_path / "configs" / f"{run.name}.toml"
        assert str(path) in script
        with open(path, "rb") as f:
            tomllib.load(f)
        job = load_config(LMJobConfig, path)
        shape = validate(job, world_size=cfg.gpus_per_node)
        assert shape.flops_per_token(job.data.seq_len) == run.flops_per_token
        assert job.train.steps * job.train.batch_size * job.data.seq_len >= run.tokens
        assert job.model.vocab_size == 128256
        assert job.optim.lr == 3e-4  # one rate at every size, whatever the CPU grid's per-size rule
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [r["name"] for r in plan["runs"]] == [r.name for r in runs]


def test_tiny_grid_runs_and_loss_falls_with_compute(grid):
    out, results = grid
    assert len(results) == 6
    for r in results:
        run_dir = out / "runs" / r["name"]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["eval/heldout_loss"] == r["loss"]
        assert 0.0 <= r["task_acc"] <= 1.0 and r["task_nll"] > 0
    best = {b: min(r["loss"] for r in results if r["budget"] == b) for b in TINY.budgets}
    assert best[3e9] < best[3e8] - 0.05, best


def test_rerun_redoes_nothing_and_a_deleted_run_is_redone(grid):
    out, results = grid
    paths = sorted(out.glob("runs/*/result.json"))
    mtimes = {p: p.stat().st_mtime_ns for p in paths}
    again = scaling.run_grid(TINY, out, verbose=False)
    assert {p: p.stat().st_mtime_ns for p in paths} == mtimes
    assert again == results
    paths[0].unlink()
    redone = scaling.run_grid(TINY, out, verbose=False)
    assert paths[0].exists()
    assert {p: p.stat().st_mtime_ns for p in paths[1:]} == {p: mtimes[p] for p in paths[1:]}
    # Deterministic for a seed: the redone run reproduces its result.
    name = paths[0].parent.name
    before = next(r for r in results if r["name"] == name)
    after = next(r for r in redone if r["name"] == name)
    for key in ("loss", "train_loss", "task_nll", "task_acc"):
        assert after[key] == before[key], key


def test_fit_writes_fit_json_and_plots(grid, tmp_path):
    out, _ = grid
    scaling.main(["fit", "--runs", str(out), "--out", str(tmp_path / "fit"), "--n-boot", "50"])
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert fit["n_runs"] == 6 and len(fit["budgets"]) == 2
    assert (tmp_path / "fit" / "isoflops.png").exists()
    assert (tmp_path / "fit" / "runs.csv").exists()
    scaling.main(["fit", "--fit-only", str(tmp_path / "fit" / "runs.csv"), "--out", str(tmp_path / "refit")])
    assert json.loads((tmp_path / "refit" / "fit.json").read_text())["n_runs"] == 6


def test_byte_corpus_is_deterministic_and_heldout_differs():
    a, b = scaling.corpus_bytes(5000, 0), scaling.corpus_bytes(5000, 0)
    assert (a == b).all() and a.max() <= scaling.EOS and a[0] == scaling.BOS
    assert not (scaling.corpus_bytes(5000, scaling.HELDOUT_SEED_OFFSET) == a).all()


def test_a_grid_dir_refuses_other_training_settings(grid):
    out, _ = grid
    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        scaling.run_grid(replace(TINY, lr=1e-3), out, verbose=False)


def test_code_source_holds_out_a_tenth_of_the_standard_library_files():
    from data.default import stdlib_files

    texts = [f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files(1 << 40)]
    n_files = len(set(texts))  # distinct file contents
    train_docs = list(itertools.islice(scaling.code_documents(0, heldout=False), len(texts)))
    held_docs = list(itertools.islice(scaling.code_documents(0, heldout=True), len(texts)))
    train_set, held_set = set(train_docs), set(held_docs)
    assert not train_set & held_set  # no file is both trained on and held out
    assert 0.05 < len(held_set) / n_files < 0.2 and len(train_set | held_set) == n_files  # a tenth, every file once
    assert train_docs[:20] != list(itertools.islice(scaling.code_documents(1, heldout=False), 20))  # seeded order
    mixed = scaling.corpus_bytes(200_000, 0, {"code": 0.5, "general": 0.5})
    text = bytes(mixed[mixed < 256].astype("uint8")).decode("utf-8", errors="replace")
    assert "def " in text and "The " in text  # both sources are in the stream
    with pytest.raises(ValueError, match="unknown sources \\['poetry'\\]"):
        scaling.corpus_bytes(100, 0, {"poetry": 1.0})


def test_word_cloze_rows_are_the_held_out_texts_words_with_distinct_options():
    text = scaling.corpus_bytes(100_000, scaling.HELDOUT_SEED_OFFSET + 1, {"code": 0.5, "general": 0.5}, True)
    raw = bytes(text[text < 256].astype("uint8")).decode("latin-1")
    contexts, options, gold = scaling.cloze_task(text, 50)
    assert (contexts, options, gold) == scaling.cloze_task(text, 50)  # deterministic
    for ctx, opts, g in zip(contexts, options, gold, strict=True):
        assert len(ctx) == scaling.CLOZE_CONTEXT and len(set(opts)) == scaling.CLOZE_OPTIONS
        assert (ctx + opts[g]).decode("latin-1") in raw  # the gold word is what follows the context
    assert 0.1 < sum(g == 0 for g in gold) / len(gold) < 0.45  # gold positions shuffled
    with pytest.raises(ValueError, match="under the 100000 rows"):
        scaling.cloze_task(text, 100_000)


def test_saved_weights_score_as_the_run_did(grid):
    out, results = grid
    run = scaling.plan_grid(TINY)[0]
    result = next(r for r in results if r["name"] == run.name)
    model = scaling.load_weights(TINY, run, out / "runs" / run.name)
    assert scaling.task_scores(model, scaling.downstream_task(TINY, out / "data")) == pytest.approx(
        (result["task_nll"], result["task_acc"]), abs=1e-6
    )


def test_run_recentres_on_the_smaller_budgets_law_and_extends_an_unbracketed_budget():
    from tests.test_scaling_fit import TRUE
    from train import scaling_fit

    # On a known surface: two budgets' optima predict the third's compute-optimal tokens.
    runs = [{**r, "budget": r["compute"]} for r in scaling_fit.synthetic_runs(TRUE, [1e18, 1e19], n_sizes=5)]
    predicted = scaling.predicted_tokens(runs, 1e20)
    assert predicted == pytest.approx(float(TRUE.optimum(1e20)[1]), rel=0.05)
    assert scaling.predicted_tokens(runs[:5], 1e20) is None  # one budget predicts nothing
    # A budget sampled wholly above its optimum gets the next smaller shape; one below it the next larger; one
    # that brackets its optimum nothing.
    above = scaling_fit.synthetic_runs(TRUE, [1e19], n_sizes=5, span=0.3, shift=0.6)
    assert scaling.extension(above, [4, 5, 6, 7, 8], 13) == 3
    below = scaling_fit.synthetic_runs(TRUE, [1e19], n_sizes=5, span=0.3, shift=-0.6)
    assert scaling.extension(below, [4, 5, 6, 7, 8], 13) == 9
    assert scaling.extension(below, [8, 9, 10, 11, 12], 13) is None  # the ladder ends there
    bracketed = scaling_fit.synthetic_runs(TRUE, [1e19], n_sizes=5, span=0.6)
    assert scaling.extension(bracketed, [4, 5, 6, 7, 8], 13) is None
