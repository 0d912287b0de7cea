"""Post-training step time and memory: our SFT and DPO loss paths vs TRL's SFTTrainer and DPOTrainer.

One step = zero_grad, forward, loss, backward, AdamW step, on the same small Llama 3 (dim 256, 4 layers, 4 heads,
2 KV heads, FFN 768, the Llama 3 vocabulary of 128256), fp32 on CPU, from the same weights (ours saved in HF's layout
and loaded by HF's LlamaForCausalLM) and on the same batch:

* SFT: 8 prompt + completion rows (~125 tokens, right-padded), the loss on the completions only. Ours is
  train/sft.py's chunked loss (``lm.loss.fused_loss_output_fn``: linear + cross-entropy in chunks, gradients taken
  in forward); TRL's is ``SFTTrainer.compute_loss`` (its fused LM head: per-token log-probs in chunks, plus the
  entropy and top-1 flags it logs).
* DPO: 4 pairs (8 rows, chosen then rejected), the paper's loss (sigmoid DPO with beta 0.1 + 0.2 x the chosen
  answers' NLL), the reference log-probs precomputed (TRL's ``precompute_ref_log_probs=True``, done when the
  trainer is built). Ours is train/dpo.py's path (``answer_logprobs_output_fn``: ``lm.loss.token_logprobs`` on the
  answers' positions only, then ``train.posttrain.losses.dpo_loss`` with the completion masks TRL uses, i.e. no
  formatting mask); TRL's is ``DPOTrainer.compute_loss``.

TRL's trainers are built for real (a word-level tokenizer over the vocabulary turns the rows' words into token ids,
TRL tokenizes, collates and precomputes), and the batch their data loader gives is the batch both sides train on.
Both sides step with torch.optim.AdamW (the same hyperparameters). The first step's losses must agree.

Each measurement (stage x side) runs in its own process: it builds its model and batch, resets the kernel's peak
resident set size (``/proc/self/clear_refs``), runs 2 warm-up steps and ``--repeats`` timed ones, and reports the
median step time, the peak RSS (``VmHWM``) and the step's peak above the RSS it started from (activations,
gradients, Adam state, logits chunks). Processes run one after another, TRL first (it writes the batch ours reads).

    python bench/posttrain_step.py [--repeats 5] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm.config import LMConfig  # noqa: E402

# ffn_hidden_dim = 256 * ceil(int(2 * 4 * 256 / 3) / 256) = 256 * ceil(682 / 256) = 768.
CONFIG = LMConfig(
    dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=256, ffn_dim_multiplier=None
)
OPTIMIZER = dict(lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
BETA, NLL_WEIGHT = 0.1, 0.2
WORDS = 128000  # token ids the rows' words map to; 128001 pads, 128009 ends a completion (Llama 3's <|eot_id|>)
PAD_ID, EOS_ID = 128001, 128009
WARMUP = 2


def _words(n: int, gen: torch.Generator) -> str:
    return "".join(f" w{i}" for i in torch.randint(0, WORDS, (n,), generator=gen).tolist())


def _rows(stage: str) -> list[dict[str, str]]:
    """The stage's rows as text TRL tokenizes: prompts of 84-98 words, answers of 22-34."""
    gen = torch.Generator().manual_seed(1 if stage == "sft" else 2)
    if stage == "sft":
        return [{"prompt": _words(84 + 2 * i, gen), "completion": _words(34 - 2 * i, gen)} for i in range(8)]
    return [{"prompt": _words(90 + i, gen), "chosen": _words(30 - i, gen), "rejected": _words(34 - 2 * i, gen)}
            for i in range(4)]  # fmt: skip


def _tokenizer():
    """A word-level tokenizer: ' w17' is token 17, so rows of words are rows of chosen token ids."""
    import transformers
    from tokenizers import Tokenizer as CoreTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {f"w{i}": i for i in range(WORDS)} | {"<pad>": PAD_ID, "<eos>": EOS_ID}
    core = CoreTokenizer(WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def _trl_setup(stage: str, model_dir: str, batch_file: str):
    """TRL's trainer for the stage, its first batch (saved for ours) and ``step(model) -> loss``."""
    import datasets
    import transformers
    import trl

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    common = dict(output_dir=os.path.join(tempfile.mkdtemp(), "trl"), use_cpu=True, bf16=False, report_to="none")
    rows = datasets.Dataset.from_list(_rows(stage))
    if stage == "sft":
        args = trl.SFTConfig(**common, per_device_train_batch_size=8, max_length=None, packing=False,
                             completion_only_loss=True)  # fmt: skip
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=_tokenizer())
    else:
        args = trl.DPOConfig(**common, per_device_train_batch_size=4, max_length=None, beta=BETA,
                             loss_type=["sigmoid", "sft"], loss_weights=[1.0, NLL_WEIGHT],
                             precompute_ref_log_probs=True)  # fmt: skip
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=_tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    torch.save(dict(batch), batch_file)
    trainer.model.train()
    return trainer.model, lambda m: trainer.compute_loss(m, dict(batch))


def _ours_setup(stage: str, model_dir: str, batch_file: str):
    """Our model from the same weights, the batch TRL collated, and ``step(model) -> loss`` as train/sft.py and
    train/dpo.py compute it."""
    from lm.checkpoint import load_pretrained
    from lm.loss import fused_loss_output_fn
    from train.dpo import answer_logprobs_output_fn
    from train.posttrain.losses import dpo_loss, sequence_logps

    model = load_pretrained(model_dir).train()
    batch = torch.load(batch_file, weights_only=True)
    inputs = batch["input_ids"][:, :-1]
    if stage == "sft":
        targets = batch["labels"][:, 1:]
        return model, lambda m: m(inputs, output=fused_loss_output_fn(targets))
    mask = batch["completion_mask"][:, 1:].bool()
    targets = torch.where(mask, batch["input_ids"][:, 1:], -100)
    pairs = len(batch["ref_chosen_logps"])
    with torch.no_grad():  # the reference TRL precomputed is ours too
        ref = sequence_logps(model(inputs, output=answer_logprobs_output_fn(targets)), mask)
    reference = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    if not torch.allclose(ref, reference, rtol=1e-4, atol=1e-3):
        raise SystemExit(f"reference log-probs differ: ours {ref.tolist()}, TRL {reference.tolist()}")

    def step(m: torch.nn.Module) -> torch.Tensor:
        logps = m(inputs, output=answer_logprobs_output_fn(targets))
        loss, _ = dpo_loss(
            logps[:pairs], logps[pairs:], reference[:pairs], reference[pairs:],
            chosen_dpo_mask=mask[:pairs], rejected_dpo_mask=mask[pairs:], chosen_nll_mask=mask[:pairs],
            beta=BETA, nll_weight=NLL_WEIGHT,
        )  # fmt: skip
        return loss

    return model, step


def memory_kb(field: str) -> int:
    """A KiB figure of this process from /proc/self/status (VmRSS, VmHWM: the high-water mark, which exec resets)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(stage: str, side: str, model_dir: str, batch_file: str, repeats: int) -> dict:
    """One process's measurement: warm-up and timed steps of one side on one stage, with its peak memory."""
    setup = _trl_setup if side == "trl" else _ours_setup
    model, loss_of = setup(stage, model_dir, batch_file)
    optimizer = torch.optim.AdamW(model.parameters(), **OPTIMIZER)
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS restarts from here (Linux)
    start_kb = memory_kb("VmRSS")

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model)
        loss.backward()
        optimizer.step()
        return loss.item()

    first_loss = step()
    for _ in range(WARMUP - 1):
        step()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    peak_kb = memory_kb("VmHWM")
    return {
        "first_loss": first_loss,
        "step_s": statistics.median(times),
        "times": times,
        "peak_mb": peak_kb / 1024,
        "step_mb": (peak_kb - start_kb) / 1024,
    }


def _run_child(stage: str, side: str, model_dir: str, batch_file: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--measure", stage, side, "--model-dir", model_dir, "--batch-file", batch_file,
           "--repeats", str(args.repeats), "--threads", str(args.threads)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not result:
        raise SystemExit(f"{stage}/{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result[-1][len("RESULT ") :])


def _report(results: dict, args: argparse.Namespace) -> None:
    header = (f"{'':<5} {'step s ours':>11} {'TRL':>7} {'TRL/ours':>9}   {'peak MB ours':>12} {'TRL':>7} "
              f"{'TRL/ours':>9}   {'step MB ours':>12} {'TRL':>7} {'TRL/ours':>9}   {'loss (step 1)':>13}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for stage in ("sft", "dpo"):
        ours, trl = results[stage]["ours"], results[stage]["trl"]
        cells = [f"{stage:<5}"]
        for key, width in (("step_s", 11), ("peak_mb", 12), ("step_mb", 12)):
            fmt = ".2f" if key == "step_s" else ".0f"
            cells.append(f"{ours[key]:>{width}{fmt}} {trl[key]:>7{fmt}} {trl[key] / ours[key]:>8.2f}x  ")
        cells.append(f"{ours['first_loss']:>13.5f}")
        print(" ".join(cells))
    print(f"\nmedian of {args.repeats} steps after {WARMUP} warm-up steps; peak MB: the process's peak resident set; "
          "step MB: that peak above the resident set before the first step (load average at the end "
          f"{os.getloadavg()[0]:.2f})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    """Save the shared weights, measure each stage and side in its own process, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement, after 2 warm-up steps")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--measure", nargs=2, metavar=("STAGE", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        stage, side = args.measure
        print("RESULT " + json.dumps(measure(stage, side, args.model_dir, args.batch_file, args.repeats)))
        return

    import transformers
    import trl

    from lm.checkpoint import save_pretrained
    from lm.model import Transformer

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"config: dim {CONFIG.dim}, {CONFIG.n_layers} layers, {CONFIG.n_heads} heads, {CONFIG.n_kv_heads} KV heads, "
          f"FFN {CONFIG.ffn_hidden_dim}, vocab {CONFIG.vocab_size}; fp32; SFT 8 rows, DPO 4 pairs (8 rows), "
          "~125 tokens a row")  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    model.init_weights()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, format="hf")
        del model
        for stage in ("sft", "dpo"):
            batch_file = os.path.join(tmp, f"{stage}_batch.pt")
            results[stage] = {side: _run_child(stage, side, tmp, batch_file, args) for side in ("trl", "ours")}
            ours, trl_loss = results[stage]["ours"]["first_loss"], results[stage]["trl"]["first_loss"]
            print(f"{stage}: step 1 loss ours {ours:.6f}, TRL {trl_loss:.6f} (|diff| {abs(ours - trl_loss):.1e})")
            if abs(ours - trl_loss) > 1e-4 * abs(trl_loss):
                raise SystemExit(f"{stage}: the losses differ on step 1: the two sides do not compute the same thing")
    print()
    _report(results, args)


if __name__ == "__main__":
    main()
