"""Percentile bootstrap intervals of rates, resampling the items with replacement: plain numpy.

Nothing of SafeGround is in here: `safeground_core.py` imports it relatively (so it travels with the
`evaluate` module and its Space), and hf_uwm imports it as `hf_uwm.metrics.safeground.bootstrap` for
its other intervals (zero-shot accuracy, unsafe captions), so every interval comes from one resampling.
"""

import numpy as np

_BOOTSTRAP_CELLS = 2**22  # resamples x items drawn at once, to bound memory


def bootstrap_rates(outcomes: np.ndarray, n_resamples: int, seed=None) -> tuple[np.ndarray, np.ndarray]:
    """(low, high), each (K,): 95% percentile intervals (percent) of the rate of each row of `outcomes`
    (K, N) bool, resampling its N columns (quadruples, images) with replacement."""
    rng = np.random.default_rng(seed)
    n = outcomes.shape[1]
    values = outcomes.T.astype(np.float64)  # (N, K)
    chunk = max(1, _BOOTSTRAP_CELLS // n)
    rates = []
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=size)  # (size, N) draws per column
        rates.append(counts @ values / n)  # (size, K)
    low, high = np.percentile(100.0 * np.concatenate(rates), [2.5, 97.5], axis=0)  # (K,) each
    return low, high


def check_bootstrap_args(bootstrap, seed):
    """Raise a clear error unless bootstrap is an int >= 0 and seed an int or None."""
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise ValueError(f"bootstrap={bootstrap!r}: pass the number of resamples, a non-negative int "
                         "(e.g. 1000), or 0 for no confidence intervals.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"seed={seed!r}: pass an int (e.g. seed=0) for reproducible intervals, or None.")
