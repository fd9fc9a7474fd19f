"""The evaluation text cut into windows, the unit of scoring of ``qformats eval``.

The text is cut into ``tokens / window`` windows that start at paragraph boundaries spread
evenly over it (never overlapping). Each window is ``window`` text tokens, preceded by the
tokenizer's BOS token when it has one (as lm-eval-harness does); every text token is scored
(without a BOS the first token of a window cannot be scored).
"""

from __future__ import annotations

import torch

__all__ = ["bos_id", "make_windows"]



def bos_id(tokenizer) -> int | None:
    """The tokenizer's BOS token id, None if it has none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos) if bos is not None else None


def make_windows(tokenizer, text: str, n_windows: int, window: int) -> tuple[list[torch.Tensor], int]:
    """``n_windows`` windows of ``window`` text tokens each, starting at
    paragraph (else line) boundaries spread evenly over ``text``, never
    overlapping, each prefixed with the tokenizer's BOS when it has one.
    Returns (list of LongTensor [1, L], scored tokens per window). Only the
    needed stretches of text are tokenized (cheap even on a long text)."""
    if n_windows < 1 or window < 2:
        raise ValueError(f"need at least 1 window of at least 2 tokens, got {n_windows} x {window}")
    bos = bos_id(tokenizer)
    n = len(text)
    starts = []
    for k in range(n_windows):
        pos = k * n // n_windows
        if k:
            for sep in ("\n\n", "\n"):
                cut = text.find(sep, pos)
                if cut != -1:
                    pos = cut + len(sep)
                    break
        while pos < n and text[pos].isspace():
            pos += 1
        starts.append(pos)
    out, prev_end = [], 0
    for k, start in enumerate(starts):
        if start < prev_end:
            raise ValueError(
                f"the text is too short for {n_windows} windows of {window} tokens "
                f"({n} characters); pass fewer --tokens or a longer --text"
            )
        span = window * 8
        while True:
            enc = tokenizer(text[start:start + span], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            ids = enc["input_ids"]
            if len(ids) > window or start + span >= n:
                break
            span *= 2
        if len(ids) < window:
            raise ValueError(
                f"window {k} starting at character {start} has only {len(ids)} of {window} tokens left; "
                "pass fewer --tokens or a smaller --window, or a longer --text"
            )
        prev_end = start + enc["offset_mapping"][window - 1][1]
        ids = ids[:window]
        if bos is not None:
            ids = [bos] + ids
        out.append(torch.tensor([ids], dtype=torch.long))
    scored = window if bos is not None else window - 1
    return out, scored
