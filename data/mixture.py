"""Data mixtures: named token sources with sampling weights, and an annealing mixture for the last steps.

The source of every packed row is a pure function of its global row index g (counted over all ranks from
the start of the run): a Kronecker low-discrepancy sequence x_g = frac(g * (sqrt(5) - 1) / 2 + offset(seed)),
mapped through the cumulative weights. Any N consecutive rows then hold each source within O(log N) rows of
N * weight, every rank can compute any row's source without communication, and resuming needs only g.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Mixture", "parse_weights"]

# The golden-ratio step and the seed offsets as 64-bit fixed point: exact on every platform, for any g.
_PHI_FIXED = np.uint64(int(((5**0.5 - 1) / 2) * 2**64))
_SQRT2_FIXED = int((2**0.5 - 1) * 2**64)


def parse_weights(spec: str) -> dict[str, float]:
    """Parse `general:0.5,math:0.25,...` into {name: weight}; raises ValueError on malformed entries."""
    weights: dict[str, float] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.rpartition(":")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not name or weight < 0:
            raise ValueError(f"bad mixture entry {item!r}: expected name:weight with weight >= 0")
        if name in weights:
            raise ValueError(f"mixture names source {name!r} twice")
        weights[name] = weight
    if not weights:
        raise ValueError(f"empty mixture {spec!r}")
    return weights


def _normalized(weights: dict[str, float], names: list[str], what: str) -> np.ndarray:
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"{what} weights name unknown sources {unknown}; sources are {names}")
    w = np.array([float(weights.get(n, 0.0)) for n in names])
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"{what} weights must be >= 0 with a positive sum, got {weights}")
    return w / w.sum()


@dataclass
class Mixture:
    """Sources (name -> prepared shard directory), their weights, and an optional annealing mixture."""

    sources: dict[str, Path]
    weights: dict[str, float]
    anneal_weights: dict[str, float] | None = None
    # Fraction of total steps, at the end of training, that draw from `anneal_weights`.
    anneal_fraction: float = 0.0
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.sources = {name: Path(path) for name, path in self.sources.items()}
        self.names = list(self.sources)
        self._base = _normalized(self.weights, self.names, "mixture")
        self._anneal = None
        if self.anneal_weights is not None:
            self._anneal = _normalized(self.anneal_weights, self.names, "annealing")
        if not 0.0 <= self.anneal_fraction <= 1.0:
            raise ValueError(f"anneal_fraction must be in [0, 1], got {self.anneal_fraction}")

    @classmethod
    def parse(
        cls,
        spec: str,
        root: str | os.PathLike[str] | None = None,
        *,
        sources: dict[str, str | os.PathLike[str]] | None = None,
        anneal: str | None = None,
        anneal_fraction: float = 0.0,
    ) -> Mixture:
        """Build from `name:weight,...`; each source is `sources[name]` or else `root/name`."""
        weights = parse_weights(spec)
        anneal_weights = parse_weights(anneal) if anneal else None
        paths: dict[str, Path] = {}
        for name in list(weights) + [n for n in (anneal_weights or {}) if n not in weights]:
            if sources and name in sources:
                paths[name] = Path(sources[name])
            elif root is not None:
                paths[name] = Path(root) / name
            else:
                raise ValueError(f"no path for source {name!r}: pass root= or sources=")
        return cls(paths, weights, anneal_weights, anneal_fraction)

    def probabilities(self, anneal: bool = False) -> dict[str, float]:
        """Normalized weights of the base (or annealing) mixture."""
        w = self._anneal if anneal and self._anneal is not None else self._base
        return dict(zip(self.names, w.tolist(), strict=True))

    def anneal_start(self, total_steps: int | None) -> int | None:
        """First step drawn from the annealing mixture, or None when there is no annealing phase."""
        if total_steps is None or self._anneal is None or self.anneal_fraction <= 0:
            return None
        return total_steps - round(self.anneal_fraction * total_steps)

    def sample(self, rows: np.ndarray, anneal: bool = False, seed: int = 0) -> np.ndarray:
        """Source index (into `names`) of each global row index in `rows`."""
        cdf = np.cumsum(self._anneal if anneal and self._anneal is not None else self._base)
        offset = np.uint64((_SQRT2_FIXED * (seed + 1)) % 2**64)
        # uint64 arithmetic wraps modulo 2**64, which is exactly taking the fractional part.
        x = np.asarray(rows, dtype=np.uint64) * _PHI_FIXED + offset
        u = (x >> np.uint64(11)).astype(np.float64) / float(2**53)
        return np.minimum(np.searchsorted(cdf, u, side="right"), len(self.names) - 1)
