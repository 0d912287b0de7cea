"""What a video container says about its length, shared by the data readers and the encoders' clip loader."""

from __future__ import annotations

from fractions import Fraction
from typing import Any


def duration_frames(container: Any, stream: Any) -> int | None:
    """The frame count a PyAV clip's duration and frame rate imply (None when either is unknown): Matroska / WebM
    declare no count but give a duration, right for a constant rate."""
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration is not None and stream.time_base is not None:
        seconds = Fraction(stream.duration) * stream.time_base
    elif container.duration is not None:
        seconds = Fraction(container.duration, 1_000_000)  # av.time_base: container durations are in microseconds
    else:
        return None
    return round(seconds * Fraction(rate)) if rate else None
