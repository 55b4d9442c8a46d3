"""Statistics of repeated measurements: a ratio of medians with its bootstrap interval, and a smoothed curve."""

import numpy as np
import pandas as pd

MIN_TRIALS_FOR_INTERVAL = 3  # fewer trials give a bootstrap interval of (almost) zero width: no interval at all


def bootstrap_ratio(numerator, denominator, n_resamples: int = 2000, seed: int = 0):
    """95% bootstrap interval of median(numerator) / median(denominator), resampling trials."""
    rng = np.random.default_rng(seed)
    num, den = np.asarray(numerator, float), np.asarray(denominator, float)
    ratios = [np.median(rng.choice(num, len(num))) / np.median(rng.choice(den, len(den))) for _ in range(n_resamples)]
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def ratio_of_medians(numerator, denominator) -> dict:
    """median(numerator) / median(denominator) and its 95% bootstrap interval (None below
    MIN_TRIALS_FOR_INTERVAL trials)."""
    num, den = pd.Series(numerator, dtype=float), pd.Series(denominator, dtype=float)
    low, high = bootstrap_ratio(num, den) if len(num) >= MIN_TRIALS_FOR_INTERVAL else (None, None)
    return {"median": float(num.median() / den.median()), "ci_low": low, "ci_high": high}


def smooth(series: pd.Series, window: int = 10) -> pd.Series:
    """Rolling median: a one-step loss spike that recovers does not count, a lasting drift does."""
    return series.rolling(min(window, len(series)), min_periods=1).median()
