"""train.scaling_fit on runs drawn from a known loss surface: exponents, intervals, pitfalls, predictions, files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from train import scaling_fit as sf

# L(N, D) = E + A/N^a + B/D^b has D* ∝ C^(a/(a+b)) under C = k·N·D: a/(a+b) = 0.53, the paper's exponent, and A
# is chosen so that D*(C) = 0.29·C^0.53 is exactly the paper's law (k = 6).
_a, _b, _B, _k = 0.371, 0.329, 1000.0, 6.0
ALPHA_TOKENS, ALPHA_PARAMS = _a / (_a + _b), _b / (_a + _b)
TRUE = sf.ParametricFit(E=1.8, A=(1 / (sf.PAPER_A * _k**0.53)) ** (_a + _b) * _b * _B / _a, B=_B, a=_a, b=_b, k=_k)
BUDGETS = (6e18, 3e19, 1e20, 3e20, 1e21)
NOISE = 0.005  # multiplicative, on the loss

# Downstream: the compute-optimal model's task NLL is 5.3 - 0.2·log10 C, a run off the optimum pays twice its excess
# loss; accuracy is 0.25 + 0.65·σ(6·(1.3 - NLL)).
SIGMOID = {"lo": 0.25, "hi": 0.9, "k": 6.0, "nll0": 1.3}


def true_nll(compute: float, loss: float) -> float:
    return 5.3 - 0.2 * math.log10(compute) + 2.0 * (loss - float(TRUE.optimum(compute)[2]))


def true_acc(nll: float) -> float:
    s = SIGMOID
    return s["lo"] + (s["hi"] - s["lo"]) / (1.0 + math.exp(-s["k"] * (s["nll0"] - nll)))


def runs_with_tasks(budgets=BUDGETS, **kwargs) -> list[dict]:
    runs = sf.synthetic_runs(TRUE, budgets, **kwargs)
    for run in runs:
        run["task_nll"] = true_nll(run["compute"], run["loss"])
        run["task_acc"] = true_acc(run["task_nll"])
    return runs


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[dict, str]:
    out = str(tmp_path_factory.mktemp("clean"))
    return sf.fit_all(runs_with_tasks(), out, seed=0, n_boot=500), out


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("noisy"))
    return sf.fit_all(sf.synthetic_runs(TRUE, BUDGETS, noise=NOISE, seed=0), out, seed=0, n_boot=1000, plots=False)


def test_the_surface_has_the_papers_law():
    a_tokens, alpha = TRUE.law("tokens")
    assert a_tokens == pytest.approx(sf.PAPER_A, rel=1e-9) and alpha == pytest.approx(0.53, abs=1e-12)


def test_isoflops_recover_the_exponents(clean):
    result, _ = clean
    assert abs(result["laws"]["tokens"]["alpha"] - ALPHA_TOKENS) < 0.02
    assert abs(result["laws"]["params"]["alpha"] - ALPHA_PARAMS) < 0.02
    for budget in result["budgets"]:  # each optimum within 2% of the truth
        _, d_opt, l_opt = TRUE.optimum(budget["compute"])
        assert abs(budget["tokens"]["x_min"] - math.log10(d_opt)) < 0.01
        assert budget["tokens"]["loss_min"] == pytest.approx(float(l_opt), rel=1e-3)
        assert budget["tokens"]["used"] and budget["tokens"]["flags"] == []
    assert result["warnings"] == []


def test_bootstrap_interval_covers_the_truth_under_noise(noisy):
    for axis, truth in (("tokens", ALPHA_TOKENS), ("params", ALPHA_PARAMS)):
        lo, hi = noisy["laws"][axis]["alpha_ci"]
        assert lo <= truth <= hi, (axis, lo, hi)
        assert hi - lo < 0.15, "an interval this wide says nothing"
    prediction = noisy["predictions"][0]
    _, d_opt, _ = TRUE.optimum(prediction["compute"])
    lo, hi = prediction["tokens"]["ci"]
    assert lo <= d_opt <= hi


@pytest.mark.parametrize("shift", [0.9, 0.45])
def test_off_centre_grid_is_flagged(shift):
    runs = sf.synthetic_runs(TRUE, BUDGETS[:-1]) + sf.synthetic_runs(TRUE, BUDGETS[-1:], shift=shift)
    fit = sf.fit_compute_optimal(runs)
    flags = fit.budgets[-1].tokens.flags
    assert {sf.OUTSIDE, sf.ONE_SIDED} & set(flags), flags
    assert any(w.startswith(f"budget {BUDGETS[-1]:.3g} FLOPs") for w in fit.warnings)
    if sf.OUTSIDE in flags:
        assert len(fit.budgets) - 1 not in fit.used["tokens"]
        assert any("excluded from the power law" in w for w in fit.warnings)


def test_downward_parabola_is_flagged_and_left_out():
    runs = sf.synthetic_runs(TRUE, BUDGETS)
    x = np.linspace(10.0, 11.0, 5)  # a bump: the loss highest mid-grid
    runs += [{"compute": 3e21, "params": 3e21 / (6 * 10**v), "tokens": 10**v, "loss": 2.3 - 0.05 * (v - 10.5) ** 2}
             for v in x]  # fmt: skip
    fit = sf.fit_compute_optimal(runs)
    bump = fit.budgets[-1]
    assert sf.DOWNWARD in bump.tokens.flags and bump.tokens.a < 0
    assert len(fit.budgets) - 1 not in fit.used["tokens"]
    assert any(sf.DOWNWARD in w and "excluded" in w for w in fit.warnings)
    assert abs(fit.laws["tokens"].alpha - ALPHA_TOKENS) < 0.02  # the other budgets still give the law


def test_too_few_and_shallow_budgets_are_flagged():
    runs = sf.synthetic_runs(TRUE, BUDGETS[:-1], noise=NOISE, seed=1)
    runs += sf.synthetic_runs(TRUE, BUDGETS[-1:], span=0.03)  # a grid too narrow to see the minimum through noise
    runs += sf.synthetic_runs(TRUE, (1e22,), n_sizes=2)
    fit = sf.fit_compute_optimal(runs)
    assert sf.SHALLOW in fit.budgets[-2].tokens.flags
    assert fit.budgets[-1].tokens.flags == [sf.TOO_FEW]
    assert len(fit.budgets) - 1 not in fit.used["tokens"]


def test_parametric_fit_recovers_the_surface(clean):
    result, _ = clean
    surface = result["parametric"]
    assert abs(surface["alpha_tokens"] - ALPHA_TOKENS) < 0.005
    assert surface["E"] == pytest.approx(TRUE.E, rel=0.01)
    assert surface["k"] == pytest.approx(6.0)
    assert result["cross_check"]["tokens"]["parametric_inside_ci"]


def test_smaller_budgets_predict_the_largest():
    runs = sf.synthetic_runs(TRUE, (6e18, 3e19, 1e20, 1e21), noise=NOISE, seed=0)
    held = sf.holdout_largest(runs)
    n_opt, d_opt, l_opt = TRUE.optimum(1e21)
    assert held["compute"] == 1e21 and len(held["fit_budgets"]) == 3
    assert 0.5 < held["predicted"]["tokens"] / d_opt < 2.0
    assert 0.5 < held["ratio"]["tokens"] < 2.0  # and against the largest budget's own IsoFLOPs minimum
    assert held["predicted"]["loss"] == pytest.approx(float(l_opt), rel=0.03)
    assert held["predicted"]["parametric_loss"] == pytest.approx(float(l_opt), rel=0.03)


def test_downstream_two_steps_recover_the_sigmoid(clean):
    result, _ = clean
    down = result["downstream"]
    for budget in BUDGETS:
        truth = true_acc(true_nll(budget, float(TRUE.optimum(budget)[2])))
        assert abs(float(sf.predict_accuracy(down, budget)) - truth) < 0.02
    assert down["nll0"] == pytest.approx(SIGMOID["nll0"], abs=0.02) and down["k"] == pytest.approx(6.0, rel=0.05)
    held = sf.holdout_largest(runs_with_tasks((6e18, 3e19, 1e20, 1e21)), parametric=False)
    assert abs(held["predicted"]["task_acc"] - true_acc(true_nll(1e21, float(TRUE.optimum(1e21)[2])))) < 0.02


def test_sigmoid_with_fixed_floor_and_ceiling():
    nll = np.linspace(0.8, 2.0, 20)
    acc = [true_acc(v) for v in nll]
    lo, hi, k, nll0, rmse = sf.fit_sigmoid(nll, acc, lo=0.25, hi=0.9)
    assert (lo, hi) == (0.25, 0.9) and k == pytest.approx(6.0, rel=1e-3) and nll0 == pytest.approx(1.3, abs=1e-3)
    assert rmse < 1e-6


def test_csv_round_trip(tmp_path):
    runs = runs_with_tasks(BUDGETS[:2], noise=NOISE)
    del runs[0]["task_acc"]  # an empty cell reads back as missing
    path = tmp_path / "runs.csv"
    sf.write_runs_csv(runs, path)
    assert sf.read_runs_csv(path) == runs
    (tmp_path / "bad.csv").write_text("compute,params,loss\n1e18,1e8,3.0\n")
    with pytest.raises(ValueError, match="tokens"):
        sf.read_runs_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="loss"):
        sf.check_runs([{"compute": 1e18, "params": 1e8, "tokens": 1e9, "loss": -1.0}])


def test_outputs_are_written(clean):
    result, out = clean
    assert result["files"] == ["isoflops.png", "power_law.png", "downstream.png", "fit.json"]
    for name in result["files"][:3]:
        with open(f"{out}/{name}", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(f"{out}/fit.json") as f:
        assert json.load(f) == result
    assert result["predictions"][0]["compute"] == sf.PAPER_TARGET_FLOPS
