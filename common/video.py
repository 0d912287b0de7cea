"""PyAV clips as the data readers and the encoders' clip loader both read them: what a container says about its
length, and frames to RGB arrays."""

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


class RGBFrames:
    """Decoded PyAV frames -> uint8 RGB arrays [H, W, 3], through a scaler of this object's own, on the calling thread.

    Why not `frame.to_ndarray(format="rgb24")`: since PyAV 17 that converts through one scaler per thread, kept for
    the life of the process, with a pool of FFmpeg threads. A DataLoader worker forked from a process that had
    converted a frame so inherits that scaler without its threads, and its first conversion waits for them forever
    (PyAV 18.1.1: the test suite's video workers hung). A scaler made per clip is never inherited, and one thread
    leaves the parallelism to the workers.
    """

    def __init__(self) -> None:
        from av.video.reformatter import VideoReformatter

        self.scaler = VideoReformatter()

    def __call__(self, frame: Any) -> Any:
        """The frame as a uint8 numpy array [H, W, 3]."""
        return self.scaler.reformat(frame, format="rgb24", threads=1).to_ndarray()
