"""Chat data in the Llama 3 format: dialogs (``messages: [{role, content}]``) tokenized with ``lm.ChatFormat``.

`formatting_mask` marks the tokens the format writes rather than the model chooses (headers and ends of turn):
DPO leaves them out of the chosen and rejected log-likelihoods (paper section 4.1.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lm.tokenizer import Tokenizer


def formatting_mask(ids: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """True at the chat format's own tokens of ``ids`` [..., T]: each header and each end of turn (or message).

    A header is ``<|start_header_id|>``, the role name's tokens, ``<|end_header_id|>`` and the blank line
    ``ChatFormat.encode_header`` writes after it (fixed by the format, so no preference signal either).
    """
    is_start = ids == tokenizer.start_header_id
    is_end = ids == tokenizer.end_header_id
    # From a header's start up to (not including) its end: the start and the role name.
    in_header = is_start.cumsum(-1) > is_end.cumsum(-1)
    blank_line = tokenizer.encode("\n\n", bos=False, eos=False)
    after_end = F.pad(is_end[..., :-1], (1, 0)) & (ids == blank_line[0]) if len(blank_line) == 1 else False
    stops = (ids == tokenizer.eot_id) | (ids == tokenizer.eom_id)
    return in_header | is_end | after_end | stops
