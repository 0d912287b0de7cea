"""Post-training in rounds (paper section 4.1, figure 7), one command: each round trains a reward model, samples
the current policy and keeps the reward model's best answers, finetunes on them, runs DPO and averages.

    python -m train.rounds --config configs/posttrain/rounds_tiny.toml [--section.key=value ...]

Before round 1 a bootstrap SFT on the instruction data gives the first policy (the paper's first round samples a
model finetuned on annotated data). Then, in round r (every stage a process of its own, its outputs under
``pipeline.dir/round{r}``):

0. ``preferences`` (with ``pipeline.collect_prompts``): ``train/rejection.py`` without a reward model draws K
   answers per prompt from the current policy and the grader labels right-vs-wrong pairs of them (the paper's
   annotators ranking the current models' answers);
1. ``reward``: ``train/reward.py`` on the preference pairs (the embedded ones, every round's collected pairs and
   every earlier round's sampled pairs), exported to ``reward/hf``;
2. ``rejection``: ``train/rejection.py`` draws K answers per training prompt from the current policy and keeps the
   reward model's best (``sft.jsonl``), the grader labelling right-vs-wrong pairs for later rounds
   (``preference.jsonl``) and every score recorded (``samples.jsonl``);
3. ``sft``: ``train/sft.py`` on the instruction data plus every round's chosen samples, from the base LM (the
   paper) or from the current policy (``pipeline.sft_init``);
4. ``dpo``: ``train/dpo.py`` from that SFT model, once per seed of ``pipeline.dpo_seeds``, on the round's own
   pairs of the policy's answers (``pipeline.dpo_pairs``);
5. ``policy``: the DPO models averaged (``train.average``; one seed: its export), the next round's policy.

A stage whose output exists is skipped, so an interrupted pipeline picks up where it stopped (a training stage
stopped midway resumes from its own last checkpoint). The end prints, beside the base LM, what each stage
achieved on held-out prompts (and, with ``pipeline.further_heldout``, on that many further prompts no data file
holds), and writes ``pipeline.dir/summary.json``; ``round{R}/policy`` is a chat model (``python -m demo
--checkpoint ...`` serves it in the chat format).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic import atomic_write_text
from train.config import NonNegativeInt, PositiveInt, parse_cli
from train.metrics import read_metrics

log = logging.getLogger("train.rounds")
EXPORT_MARKER = "config.json"
# The summary's figures on the further held-out prompts: "further/accuracy", ...
FURTHER = "further"


@dataclass
class PipelineConfig:
    """Where the rounds live, what they start from and how many run."""

    dir: str = "runs/posttrain/rounds"
    # The pretrained LM (Meta or HF layout): the bootstrap SFT starts from it.
    base: str = "runs/lm/debug/hf"
    # The embedded instruction and preference data (written there on first use).
    data_dir: str = "runs/data/instruct"
    rounds: PositiveInt = 1
    nproc_per_node: PositiveInt = 2
    # One DPO run per seed in each round, their weights averaged into the round's policy (paper: model averaging).
    dpo_seeds: list[NonNegativeInt] = field(default_factory=lambda: [0])
    # The reward model's trunk: "base" (the paper: the pretrained LM) or "policy" (the round's policy, which has
    # already seen the chat format: a tiny LM ranks answers far better from there).
    reward_init: str = "policy"
    # Each round's SFT starts from "base" (the paper: the pretrained LM, every round) or "policy" (the round's
    # policy, so the round goes on from what the SFT before it learnt: a tiny SFT that has not converged in one stage
    # otherwise starts over, and two such runs land far apart).
    sft_init: str = "base"
    # Held-out prompts graded for the base LM in the summary (0: not graded).
    heldout_samples: NonNegativeInt = 100
    # Further held-out prompts (``data.preference.further_heldout``) on which the summary grades every stage's
    # model, base LM included (0: none): 1,000 measure a stage's change to about 1.5 points, the 200 of
    # heldout.jsonl to 3.5, more than DPO's effect at this scale.
    further_heldout: NonNegativeInt = 0
    # Each round first collects graded pairs of the policy's own answers to this many instruction prompts (the last
    # ones of the file; rejection sampling takes the first), for the reward model and DPO: the paper has annotators
    # rank the current models' answers, and a reward model that never saw them misranks them. 0 = none.
    collect_prompts: NonNegativeInt = 0
    # DPO's pairs: "recent", this round's collected and sampled pairs of the current policy's answers (paper 4.1.4:
    # the latest batches, collected with the best models of the previous round; the embedded pairs instead when
    # those files hold none), or "all", every pair the reward model saw and this round's sampled ones.
    dpo_pairs: str = "recent"


@dataclass
class StageConfig:
    """One stage's TOML config and the extra ``--section.key=value`` overrides it gets in every round."""

    # "" = the stage's tiny config, configs/posttrain/<stage>_tiny.toml.
    config: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class RoundsConfig:
    """Root config of ``python -m train.rounds``."""

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sft: StageConfig = field(default_factory=StageConfig)
    reward: StageConfig = field(default_factory=StageConfig)
    rejection: StageConfig = field(default_factory=StageConfig)
    dpo: StageConfig = field(default_factory=StageConfig)

    def stage(self, name: str) -> StageConfig:
        """Stage ``name``'s config with its TOML file resolved."""
        stage = getattr(self, name)
        return StageConfig(stage.config or f"configs/posttrain/{name}_tiny.toml", list(stage.overrides))


class Pipeline:
    """Runs the stages as processes, skipping those whose output exists, and keeps the record of each."""

    def __init__(self, cfg: RoundsConfig) -> None:
        self.cfg, self.dir = cfg, Path(cfg.pipeline.dir)
        self.python = sys.executable
        nproc = cfg.pipeline.nproc_per_node
        # One process needs no launcher: a script started by python makes its own one-rank group
        # (train.parallel.mesh.init_distributed), where torchrun's agent would be a second interpreter per stage.
        self.launch = (
            [self.python] if nproc == 1 else [self.python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        )

    def run(self, name: str, done: Path, *commands: Sequence[str]) -> bool:
        """Run ``commands`` in turn unless ``done`` exists; True when they ran."""
        if done.exists():
            log.info("%s: done (%s exists), skipped", name, done)
            return False
        start = time.monotonic()
        for command in commands:
            log.info("%s: %s", name, " ".join(command))
            finished = subprocess.run(list(command), check=False)
            if finished.returncode != 0:
                raise SystemExit(f"train.rounds: stage {name} failed (exit {finished.returncode}): {' '.join(command)}")
        if not done.exists():
            raise SystemExit(f"train.rounds: stage {name} ended without writing {done}")
        log.info("%s: finished in %.0f s", name, time.monotonic() - start)
        return True

    def train(self, name: str, script: str, stage: StageConfig, run_dir: Path, *overrides: str) -> Path:
        """A training stage (launched as `launch` says) exported to ``run_dir/hf``; returns that directory."""
        hf = run_dir / "hf"
        command = [*self.launch, script, "--config", stage.config, f"--run.dir={run_dir}", *stage.overrides]
        export = [self.python, "-m", "train.export", str(run_dir), "--out", str(hf), "--overwrite"]
        self.run(name, hf / EXPORT_MARKER, [*command, *overrides], export)
        return hf

    def data_file(self, name: str) -> str:
        """An embedded data file (instruction train set, preference pairs), written on first use."""
        from data.instruct import TRAIN_FILE, ensure_instruct_data
        from data.preference import PREFERENCE_FILE, ensure_preference_data

        data_dir = self.cfg.pipeline.data_dir
        path = (ensure_instruct_data(data_dir) / TRAIN_FILE) if name == "instruct" else None
        if name == "preference":
            ensure_preference_data(data_dir)
            path = Path(data_dir) / PREFERENCE_FILE
        return str(path)

    def round(self, number: int, policy: Path) -> Path:
        """Round ``number`` from ``policy``; returns the round's new policy."""
        cfg, here = self.cfg, self.dir / f"round{number}"
        earlier = [self.dir / f"round{r}" / "rejection" for r in range(1, number)]
        collected = [self.dir / f"round{r}" / "preferences" / "preference.jsonl" for r in range(1, number)]
        fresh = self.collect(number, policy, here)
        collected = [str(path) for path in collected if path.is_file()] + fresh
        pairs = ",".join([self.data_file("preference"), *(str(d / "preference.jsonl") for d in earlier), *collected])
        trunk = cfg.pipeline.base if cfg.pipeline.reward_init == "base" else str(policy)
        reward = self.train(
            f"round {number} reward model", "train/reward.py", cfg.stage("reward"), here / "reward",
            f"--model.init_from={trunk}", f"--data.files={pairs}", f"--data.dir={cfg.pipeline.data_dir}",
            f"--eval.pairs_file={Path(cfg.pipeline.data_dir) / 'preference_heldout.jsonl'}",
        )  # fmt: skip
        samples, rejection = here / "rejection", cfg.stage("rejection")
        self.run(
            f"round {number} rejection sampling",
            samples / "summary.json",
            [*self.launch, "train/rejection.py", "--config", rejection.config, *rejection.overrides,
             f"--run.dir={samples}", f"--models.policy={policy}", f"--models.reward={reward}",
             f"--data.files={self.data_file('instruct')}"],
        )  # fmt: skip
        chats = ",".join([self.data_file("instruct"), *(str(d / "sft.jsonl") for d in [*earlier, samples])])
        sft_trunk = cfg.pipeline.base if cfg.pipeline.sft_init == "base" else str(policy)
        sft = self.train(
            f"round {number} SFT", "train/sft.py", cfg.stage("sft"), here / "sft",
            f"--model.init_from={sft_trunk}", f"--data.files={chats}",
            f"--eval.file={Path(cfg.pipeline.data_dir) / 'heldout.jsonl'}",
        )  # fmt: skip
        dpo_files = [path for path in [*fresh, str(samples / "preference.jsonl")] if Path(path).stat().st_size]
        if cfg.pipeline.dpo_pairs == "all" or not dpo_files:
            dpo_files = [pairs, str(samples / "preference.jsonl")]
        pairs = ",".join(dpo_files)
        dpo_runs = [
            self.train(
                f"round {number} DPO (seed {seed})",
                "train/dpo.py",
                cfg.stage("dpo"),
                here / f"dpo_seed{seed}",
                f"--model.init_from={sft}",
                f"--data.files={pairs}",
                f"--run.seed={seed}",
                f"--data.seed={seed}",
                f"--eval.file={Path(cfg.pipeline.data_dir) / 'heldout.jsonl'}",
                f"--eval.pairs_file={Path(cfg.pipeline.data_dir) / 'preference_heldout.jsonl'}",
            )  # fmt: skip
            for seed in cfg.pipeline.dpo_seeds
        ]
        return self.average(number, here / "policy", dpo_runs)

    def collect(self, number: int, policy: Path, here: Path) -> list[str]:
        """The round's graded pairs of ``policy``'s answers to the last ``pipeline.collect_prompts`` instruction
        prompts (``train/rejection.py`` without a reward model), as a one-file list; [] when that is 0."""
        count, rejection = self.cfg.pipeline.collect_prompts, self.cfg.stage("rejection")
        if not count:
            return []
        instruct, out = self.data_file("instruct"), here / "preferences"
        with open(instruct) as f:
            total = sum(1 for line in f if line.strip())
        self.run(
            f"round {number} preference collection",
            out / "summary.json",
            [*self.launch, "train/rejection.py", "--config", rejection.config, *rejection.overrides,
             f"--run.dir={out}", f"--models.policy={policy}", "--models.reward=", f"--data.files={instruct}",
             f"--data.skip={max(0, total - count)}", f"--data.limit={count}"],
        )  # fmt: skip
        return [str(out / "preference.jsonl")]

    def average(self, number: int, out: Path, models: list[Path]) -> Path:
        """The round's policy: the models' average (one model: a copy of it)."""
        if len(models) == 1:
            self.run(
                f"round {number} policy", out / EXPORT_MARKER, [self.python, "-c", _COPY, str(models[0]), str(out)]
            )
        else:
            command = [self.python, "-m", "train.average", str(out), *map(str, models)]
            self.run(f"round {number} policy (average of {len(models)})", out / EXPORT_MARKER, command)
        return out


# Copied to a temporary name, then renamed: an interrupted copy is never taken for a finished policy.
_COPY = (
    "import shutil, sys, pathlib; src, out = map(pathlib.Path, sys.argv[1:]); tmp = out.with_name(out.name + '.tmp');"
    " shutil.rmtree(tmp, ignore_errors=True); shutil.copytree(src, tmp); tmp.rename(out)"
)


def last_eval(run_dir: Path) -> dict[str, float]:
    """The held-out figures (``eval/*``) of a run's last evaluation, without the prefix."""
    records = [r for r in read_metrics(str(run_dir)) if any(k.startswith("eval/") for k in r)]
    return {k.removeprefix("eval/"): v for k, v in (records[-1] if records else {}).items() if k.startswith("eval/")}


def summarize(cfg: RoundsConfig, base_accuracy: dict[str, float]) -> dict[str, dict[str, float]]:
    """What each stage achieved on held-out data, by stage name, the base LM first."""
    root = Path(cfg.pipeline.dir)
    summary = {"base LM": base_accuracy, "bootstrap SFT": last_eval(root / "bootstrap" / "sft")}
    models = {"base LM": Path(cfg.pipeline.base), "bootstrap SFT": root / "bootstrap" / "sft" / "hf"}
    for number in range(1, cfg.pipeline.rounds + 1):
        here = root / f"round{number}"
        collection = here / "preferences" / "summary.json"
        if collection.is_file():
            summary[f"round {number} preference collection"] = json.loads(collection.read_text())
        summary[f"round {number} reward model"] = last_eval(here / "reward")
        rejection = here / "rejection" / "summary.json"
        summary[f"round {number} rejection sampling"] = json.loads(rejection.read_text()) if rejection.is_file() else {}
        summary[f"round {number} SFT"] = last_eval(here / "sft")
        models[f"round {number} SFT"] = here / "sft" / "hf"
        for seed in cfg.pipeline.dpo_seeds:
            summary[f"round {number} DPO (seed {seed})"] = last_eval(here / f"dpo_seed{seed}")
            models[f"round {number} DPO (seed {seed})"] = here / f"dpo_seed{seed}" / "hf"
        if len(cfg.pipeline.dpo_seeds) > 1 and (here / "policy" / EXPORT_MARKER).is_file():
            # The paper averages a stage's runs; the average is graded like the runs it comes from.
            name = f"round {number} policy (average of {len(cfg.pipeline.dpo_seeds)} DPO seeds)"
            summary[name] = graded_checkpoint(here / "policy", here / "policy_eval.json", heldout_rows(cfg))
            models[name] = here / "policy"
    if cfg.pipeline.further_heldout:
        from data.preference import further_heldout

        rows = further_heldout(cfg.pipeline.data_dir, cfg.pipeline.further_heldout)
        for name, model in models.items():
            stored = root / "further_eval" / f"{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}.json"
            figures = graded_checkpoint(model, stored, rows)
            summary[name].update({f"{FURTHER}/{key}": value for key, value in figures.items()})
    return summary


def heldout_rows(cfg: RoundsConfig) -> list[dict]:
    """The first ``pipeline.heldout_samples`` rows of the held-out file (written if missing)."""
    from data.instruct import HELDOUT_FILE, ensure_instruct_data
    from train.posttrain.heldout import read_graded_rows

    return read_graded_rows(ensure_instruct_data(cfg.pipeline.data_dir) / HELDOUT_FILE, cfg.pipeline.heldout_samples)


def grading_key(checkpoint: str | Path, rows: list[dict]) -> str:
    """What a checkpoint's stored grading depends on: its files (name, size, modification time), the prompts and
    the grader's version."""
    from data.instruct import GRADER_VERSION

    stats = [(p.name, p.stat()) for p in Path(checkpoint).iterdir() if p.is_file()]
    files = sorted((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats)
    return hashlib.sha256(json.dumps([files, rows, GRADER_VERSION], sort_keys=True).encode()).hexdigest()


def graded_checkpoint(checkpoint: str | Path, stored: Path, rows: list[dict]) -> dict[str, float]:
    """A checkpoint's greedy answers to ``rows``' prompts, graded; stored in ``stored``, which a rerun reads back
    while the checkpoint and the prompts are the ones it was graded on (a retrained stage is graded again)."""
    if not rows:
        return {}
    key = grading_key(checkpoint, rows)
    if stored.is_file() and (previous := json.loads(stored.read_text())).get("key") == key:
        return previous["figures"]
    from lm import load_pretrained
    from lm.tokenizer import ChatFormat, Tokenizer
    from train.posttrain.heldout import graded_accuracy

    log.info("grading %s on %d held-out prompts", checkpoint, len(rows))
    result = graded_accuracy(load_pretrained(checkpoint), ChatFormat(Tokenizer()), rows, max_new_tokens=48)
    figures = {k.removeprefix("eval/"): v for k, v in result.items()}
    stored.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stored, json.dumps({"key": key, "figures": figures}))
    return figures


def base_accuracy(cfg: RoundsConfig) -> dict[str, float]:
    """The base LM's held-out figures (graded once, then read back)."""
    return graded_checkpoint(cfg.pipeline.base, Path(cfg.pipeline.dir) / "base_eval.json", heldout_rows(cfg))


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    """One line per stage: its held-out figures; then its figures on the further held-out prompts, if graded."""
    lines, further, prefix = [], [], f"{FURTHER}/"
    for stage, figures in summary.items():
        numbers = {k: v for k, v in sorted(figures.items()) if isinstance(v, (int, float))}
        shown = ", ".join(f"{k} {v:.3g}" for k, v in numbers.items() if not k.startswith(prefix))
        lines.append(f"{stage:<32} {shown or '(no held-out figures)'}")
        wider = ", ".join(f"{k.removeprefix(prefix)} {v:.3g}" for k, v in numbers.items() if k.startswith(prefix))
        if wider:
            further.append(f"{stage:<32} {wider}")
    if further:
        lines += ["on the further held-out prompts (pipeline.further_heldout):", *further]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the bootstrap SFT and the rounds, then print and store what each stage achieved."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m train.rounds", description=__doc__.split("\n\n")[0])
    cfg, _ = parse_cli(RoundsConfig, argv, parser)
    for key in ("reward_init", "sft_init"):
        if getattr(cfg.pipeline, key) not in ("base", "policy"):
            parser.error(f"pipeline.{key}={getattr(cfg.pipeline, key)!r}: expected 'base' or 'policy'")
    if cfg.pipeline.dpo_pairs not in ("recent", "all"):
        parser.error(f"pipeline.dpo_pairs={cfg.pipeline.dpo_pairs!r}: expected 'recent' or 'all'")
    for name in ("sft", "reward", "rejection", "dpo"):
        stage = cfg.stage(name)
        if not Path(stage.config).is_file():
            parser.error(f"stage config {stage.config} does not exist")
    if not Path(cfg.pipeline.base).is_dir():
        parser.error(f"pipeline.base={cfg.pipeline.base} is not a checkpoint directory (run `make quickstart` first)")
    pipeline = Pipeline(cfg)
    root = Path(cfg.pipeline.dir)
    policy = pipeline.train(
        "bootstrap SFT", "train/sft.py", cfg.stage("sft"), root / "bootstrap" / "sft",
        f"--model.init_from={cfg.pipeline.base}", f"--data.dir={cfg.pipeline.data_dir}",
    )  # fmt: skip
    for number in range(1, cfg.pipeline.rounds + 1):
        policy = pipeline.round(number, policy)
    summary = summarize(cfg, base_accuracy(cfg))
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2))
    print("post-training: what each stage achieved on held-out prompts and pairs:\n" + format_summary(summary))
    print(f"post-training: the chat model is {policy}; serve it with: {sys.executable} -m demo --checkpoint {policy}")
    return summary


if __name__ == "__main__":
    main()
