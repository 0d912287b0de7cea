"""The CUDA recipe, exercised on CPU: bf16 parameters with fp32 gradient reduction (FSDP2's MixedPrecisionPolicy,
``--parallel.mixed_precision_on_cpu``), compiled blocks and activation checkpointing, on 2 gloo ranks.

It must run, learn, and stay close to the fp32 run of the same steps (the shared 1-rank ``reference``, which every
fp32 layout reproduces to 1e-5): same corpus, same init checkpoint, same global batches. gloo all-gathers the bf16
parameters and reduce-scatters the fp32 gradients, and inductor compiles the bf16 blocks, all on CPU.

Selective checkpointing cannot join them (``test_selective_checkpointing_under_mixed_precision_still_fails``):
the composable ``checkpoint`` recomputes a block by calling it again, FSDP's pre-forward hook included, and under a
mixed-precision policy that hook casts the inputs inside ``torch.profiler.record_function``, an op the selective
policy's recompute mode meets without having cached it in forward (where FSDP's hook, prepended, ran before the
checkpoint's). None of that code is CPU-specific, so the CUDA recipe with ``--train.ac=selective`` should fail the
same way (torch 2.14.1; not yet run on a GPU); full checkpointing stands in for it here.
"""

from __future__ import annotations

from tests.lm_runs import STEPS, args, losses, run

RECIPE = [
    "--parallel.mixed_precision_on_cpu=true",
    "--parallel.param_dtype=bfloat16",
    "--parallel.reduce_dtype=float32",
    "--train.compile=true",
]
# Largest |loss - fp32 loss| over the 12 steps. Measured 1.5e-3 (step 2; 4e-5 to 1.5e-3 over the steps, about 1e-4
# of the loss); the bound leaves ~7x for other CPUs' bf16 kernels and inductor's fusion choices while staying ~100x
# below what the run learns (its loss falls by 1.2).
MAX_GAP = 1e-2
# Losses of fp32 runs agree to 1e-5 relative (~1e-4 absolute here): a gap above that shows bf16 really applied.
MIN_GAP = 1e-4
SELECTIVE_ERROR = "_record_function_enter_new.default encountered during backward but not found in storage"


def test_cuda_recipe_trains_close_to_fp32(setup, reference, tmp_path):
    run_dir = tmp_path / "recipe"
    run(2, args(setup, run_dir, *RECIPE, "--train.ac=full"))
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS] < got[1] - 0.5, got  # it learns
    gaps = {step: abs(got[step] - reference[step]) for step in got}
    print("recipe vs fp32 loss gaps:", {s: f"{g:.1e}" for s, g in gaps.items()}, "fall", got[1] - got[STEPS])
    assert MIN_GAP < max(gaps.values()) <= MAX_GAP, gaps


def test_selective_checkpointing_under_mixed_precision_still_fails(setup, tmp_path):
    """The one part of the recipe that cannot run (see above); once torch fixes it, add selective to the test above."""
    argv = args(setup, tmp_path / "selective", *RECIPE, "--train.ac=selective", "--train.steps=1")
    proc = run(2, argv, check=False)
    assert proc.returncode != 0
    assert SELECTIVE_ERROR in proc.stdout + proc.stderr, proc.stderr[-3000:]
