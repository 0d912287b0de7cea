"""Pipeline parallel: the model's layers split into stages, several virtual stages per rank, torch's schedules.

Stage ``s`` of ``S`` holds a contiguous run of layers (:func:`stage_layer_ids`); the first stage also holds the
token embeddings, the last the final norm and the output projection (and computes the loss). A rank holds
``virtual_stages`` stages (:func:`rank_stages`): one for 1F1B / GPipe, several for the interleaved schedules.
"""

from __future__ import annotations

RANK_STAGE_STYLES = ("loop", "v")


def stage_layer_ids(n_layers: int, num_stages: int, *, lighter_ends: bool = False) -> list[list[int]]:
    """Contiguous layer ids of each stage, in order; ``lighter_ends``: first and last stage one layer fewer.

    The layers split as evenly as possible (the first stages take the remainder). With ``lighter_ends`` the split
    is that of ``n_layers + 2`` layers with the first and last stage then giving one back, since they also hold
    the embeddings / the output and loss (the paper's 405B: 126 layers on 16 stages = 7, 8 x 14, 7); the
    remainder then goes to the middle stages first.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if num_stages < 1:
        raise ValueError(f"the number of pipeline stages must be >= 1, got {num_stages}")
    lighten = lighter_ends and num_stages > 1
    total = n_layers + 2 if lighten else n_layers
    base, extra = divmod(total, num_stages)
    sizes = [base] * num_stages
    # Which stages take the remainder: the middle ones first when the ends are meant to stay light.
    order = list(range(1, num_stages - 1)) + [0, num_stages - 1] if lighten else list(range(num_stages))
    for stage in order[:extra]:
        sizes[stage] += 1
    if lighten:
        sizes[0] -= 1
        sizes[-1] -= 1
    if min(sizes) < 1:
        ends = " with pipeline lighter_ends (first and last stage one layer fewer)" if lighten else ""
        raise ValueError(
            f"{n_layers} layers cannot fill {num_stages} pipeline stages{ends}: a stage would hold no layer "
            f"(sizes {sizes}); use fewer stages (pp x pp_virtual_stages) or more layers"
        )
    starts = [sum(sizes[:s]) for s in range(num_stages)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes, strict=True)]


def rank_stages(pp_rank: int, pp: int, virtual_stages: int, style: str) -> list[int]:
    """The stage indices pipeline rank ``pp_rank`` of ``pp`` holds, in execution order.

    ``loop``: ``pp_rank, pp_rank + pp, ...`` (1F1B / GPipe with one stage, the interleaved schedules);
    ``v``: ``pp_rank`` and ``2 * pp - 1 - pp_rank`` (V-shaped zero-bubble: the first rank holds the first and the
    last stage, so the loss sits beside the embeddings).
    """
    if pp < 1:
        raise ValueError(f"parallel.pp must be >= 1, got {pp}")
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pipeline rank {pp_rank} is outside 0..{pp - 1}")
    if virtual_stages < 1:
        raise ValueError(f"parallel.pp_virtual_stages must be >= 1, got {virtual_stages}")
    if style == "loop":
        return [pp_rank + v * pp for v in range(virtual_stages)]
    if style == "v":
        if virtual_stages != 2:
            raise ValueError(
                f"a V-shaped schedule holds exactly 2 stages per rank, got pp_virtual_stages={virtual_stages}"
            )
        return [pp_rank, 2 * pp - 1 - pp_rank]
    raise ValueError(f"stage style must be one of {RANK_STAGE_STYLES}, got {style!r}")
