"""Adapter evaluation that works on any data: does the model use the media, and how close are its answers?

The adapter stage's graders (``data.grading``) read answers about the embedded synthetic data only (a scene's
'colour shape', a clip's direction of motion). On other data (photos with captions, clips, recordings with
transcripts) train/adapter.py reports instead:

- the held-out loss of the target tokens given each sample's own media (``eval/loss``) beside the same loss with
  the media shuffled across the held-out samples (``eval/loss_shuffled_media``, the control: every caption or
  transcript gets another sample's media). A model that reads the media scores its own media better than another's;
  a model that ignores them scores both alike, whatever its loss.
- caption metrics of its greedy answers that need no download: corpus BLEU-4 (``eval/bleu4``, 0-100, sacrebleu's
  defaults: a corpus of captions under four words long holds no 4-gram and scores 0, however good) and the word
  error rate (``eval/wer``, the speech stage's figure; 0 is perfect, above 1 is possible).

Texts are compared as ``data.grading.normalize_text`` leaves them (lower case, punctuation dropped), so a caption's
full stop or capital letter is no error. tests/test_adapter_eval.py proves both metrics against sacrebleu and jiwer.

Whether the held-out data are the embedded synthetic data is read from the shards' directory: ``data.synthetic``
writes its manifest.json beside the shards it made (``is_embedded_data``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from data.grading import normalize_text

# The media fields of a decoded sample (data.media): what the control moves from one sample to another.
MEDIA_FIELDS = ("image", "video", "audio")
MAX_ORDER = 4
# Log of a zero precision in sacrebleu (its `my_log`): a BLEU with no matches of some order is ~0, not an error.
LOG_ZERO = -9999999999.0
CAPTION_KEYS = ("eval/bleu4", "eval/wer")

LossOf = Callable[[dict], tuple[torch.Tensor, torch.Tensor]]


def words(text: str) -> list[str]:
    """The words a metric compares: normalised (lower case, no punctuation), split on spaces."""
    return normalize_text(text).split()


# ----------------------------------------------------------------------------------------------------------------
# Caption metrics.


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of the n-grams of a token list."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu_statistics(
    hypotheses: Sequence[str], references: Sequence[str], max_order: int = MAX_ORDER
) -> tuple[list[int], list[int], int, int]:
    """BLEU's sufficient statistics over a corpus: clipped n-gram matches and n-gram totals per order, and the
    hypotheses' and references' lengths in words (one reference per hypothesis)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    correct, total = [0] * max_order, [0] * max_order
    sys_len = ref_len = 0
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        hyp, ref = words(hypothesis), words(reference)
        sys_len, ref_len = sys_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_order + 1):
            hyp_counts, ref_counts = ngrams(hyp, n), ngrams(ref, n)
            # Clipped: an n-gram counts at most as often as the reference holds it.
            correct[n - 1] += sum(min(count, ref_counts[gram]) for gram, count in hyp_counts.items())
            total[n - 1] += sum(hyp_counts.values())
    return correct, total, sys_len, ref_len


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], max_order: int = MAX_ORDER) -> float:
    """Corpus BLEU-4 in 0-100 as sacrebleu computes it by default (brevity penalty, 'exp' smoothing), on words."""
    correct, total, sys_len, ref_len = bleu_statistics(hypotheses, references, max_order)
    if not any(correct):
        return 0.0
    brevity = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len)
    logs, smooth = [], 1.0
    for n in range(max_order):
        if total[n] == 0:
            # No hypothesis is n words long: this and every higher order have precision 0 (sacrebleu stops here).
            logs += [LOG_ZERO] * (max_order - n)
            break
        if correct[n] == 0:
            # NIST's smoothing (mteval-v13a, sacrebleu's default): each order without a match halves the last.
            smooth *= 2
            logs.append(math.log(100.0 / (smooth * total[n])))
        else:
            logs.append(math.log(100.0 * correct[n] / total[n]))
    return brevity * math.exp(sum(logs) / max_order)


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance in words: the fewest substitutions, deletions and insertions turning one into the other."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]


def word_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER: word edits over all pairs divided by the references' words (jiwer's wer on normalised text)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    errors = sum(edit_distance(words(r), words(h)) for h, r in zip(hypotheses, references, strict=True))
    reference_words = sum(len(words(r)) for r in references)
    if reference_words == 0:
        raise ValueError("the references hold no words: a word error rate is undefined")
    return errors / reference_words


def caption_metrics(generated: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """eval/bleu4 and eval/wer of generated answers against their reference captions or transcripts (wer NaN when
    the references hold no word: an evaluation must not stop a run)."""
    has_words = any(words(r) for r in references)
    wer = word_error_rate(generated, references) if has_words else math.nan
    return {"eval/bleu4": corpus_bleu(generated, references), "eval/wer": wer}


# ----------------------------------------------------------------------------------------------------------------
# The media control.


def shuffled_media(samples: Sequence[dict], following: dict | None = None) -> list[dict]:
    """The samples with their media moved one place on: sample i gets sample i+1's, the last gets `following`'s
    (the split's next sample, so a rank's share of one sample still has a control), or without it the first's.
    Every caption or transcript meets another sample's media. Without `following`, fewer than 2 samples: []."""
    donors = [*samples[1:], following] if following is not None else [*samples[1:], *samples[:1]]
    if following is None and len(samples) < 2:
        return []
    out = []
    for sample, donor in zip(samples, donors, strict=True):
        moved = {k: v for k, v in sample.items() if k not in MEDIA_FIELDS}
        moved.update({k: donor[k] for k in MEDIA_FIELDS if k in donor})
        out.append(moved)
    return out


def rank_share(total: int, per_rank: int, rank: int, ranks: int) -> tuple[int, int]:
    """(skip, count) of a rank's held-out loss samples: disjoint, at most `per_rank`, and as many on every rank (a
    split of `total` shorter than per_rank x ranks is shared evenly), since each evaluation forward of a sharded
    model gathers on every rank: a rank with one batch more than another would wait for it forever."""
    count = min(per_rank, total // ranks)
    return rank * count, count


def loss_sum(batches: Sequence[dict], loss_of: LossOf) -> torch.Tensor:
    """[sum of the target tokens' losses, their count] over batches (float64), for an all-reduce across ranks."""
    out = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            loss, n = loss_of(batch)
            out += torch.tensor([loss.item() * n.item(), n.item()], dtype=torch.float64)
    return out


def media_losses(sums: torch.Tensor) -> dict[str, float]:
    """eval/loss and eval/loss_shuffled_media from summed [[loss, count] with media, [loss, count] shuffled]; the
    control is left out when no rank had two held-out samples to shuffle."""
    out = {"eval/loss": (sums[0, 0] / sums[0, 1].clamp(min=1)).item()}
    if sums[1, 1] > 0:
        out["eval/loss_shuffled_media"] = (sums[1, 0] / sums[1, 1]).item()
    return out


def is_embedded_data(data_dir: str | Path, kind: str, split: str = "heldout") -> bool:
    """Whether a split's shards (data.media.find_shards of ``data_dir``) are data.synthetic's embedded set: its
    manifest.json, naming this kind, lies beside them."""
    from data.media import SUBDIRS, find_shards

    manifest = find_shards(data_dir, kind, split)[0].parent / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("kind") == SUBDIRS[kind]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
