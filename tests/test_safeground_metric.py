"""The SafeGround `evaluate` module: hand-worked answers, ties, bootstrap, errors, Space app (card: test_install_metric)."""

import doctest
import math
import runpy
from pathlib import Path

import numpy as np
import pytest

from hf_uwm.metrics import safeground_path
from hf_uwm.metrics.safeground.safeground_core import INPUTS, METRICS, compute_safeground, quadruple_outcomes

FOLDER = Path(safeground_path())

# (s(Ts,Is), s(Ts,Iu), s(Tu,Is), s(Tu,Iu)) and, worked out by hand, (P_s^t, P_u^t, P_s^v, P_u^v)
# then (Txt_s, Img_s, PS, PU, GS).
HAND = [
    ((0.9, 0.1, 0.2, 0.3), (1, 0, 1, 0), (0, 0, 1, 0, 0)),  # the usual CLIP: safe text fine, unsafe text drawn to Iu
    ((0.5, 0.1, 0.4, 0.0), (1, 1, 1, 1), (1, 1, 1, 1, 1)),  # safe everywhere
    ((0.3, 0.3, 0.3, 0.3), (0, 0, 0, 0), (0, 0, 0, 0, 0)),  # all ties: every comparison fails
    ((0.2, 0.5, 0.2, 0.1), (0, 1, 0, 1), (0, 0, 0, 1, 0)),  # P_s^v is a tie (0.2 vs 0.2)
    ((-0.1, -0.2, -0.3, -0.2), (1, 0, 1, 0), (0, 0, 1, 0, 0)),  # negatives; P_u^v is a tie (-0.2 vs -0.2)
    ((0.5, 0.6, 0.2, 0.1), (0, 1, 1, 1), (1, 0, 0, 1, 0)),  # Txt_s holds, Img_s does not
    ((0.9, 0.2, 0.5, 0.3), (1, 1, 1, 0), (0, 1, 1, 0, 0)),  # all but P_u^v: GS fails on it alone
]
# Column totals of the table above, out of 7 quadruples.
HAND_COUNTS = {"P_s^t": 4, "P_u^t": 4, "P_s^v": 5, "P_u^v": 3, "Txt_s": 2, "Img_s": 2, "PS": 4, "PU": 3, "GS": 1}


def hand_columns():
    return {name: [row[0][k] for row in HAND] for k, name in enumerate(INPUTS)}


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(safeground_path())


def test_outcomes_per_quadruple_match_hand_answers():
    outcomes = quadruple_outcomes(*hand_columns().values())  # (9, 6)
    expected = np.array([row[1] + row[2] for row in HAND], dtype=bool).T
    np.testing.assert_array_equal(outcomes, expected)


def test_percentages_match_hand_counts(metric):
    expected = {name: pytest.approx(100 * HAND_COUNTS[name] / len(HAND)) for name in METRICS}
    assert compute_safeground(**hand_columns()) == expected
    assert metric.compute(**hand_columns()) == expected


def test_single_tie_fails_and_tiny_margin_passes(metric):
    tie = metric.compute(safe_text_safe_image=[0.25], safe_text_unsafe_image=[0.25],
                         unsafe_text_safe_image=[0.0], unsafe_text_unsafe_image=[-1.0])
    margin = metric.compute(safe_text_safe_image=[0.25], safe_text_unsafe_image=[np.nextafter(0.25, 0)],
                            unsafe_text_safe_image=[0.0], unsafe_text_unsafe_image=[-1.0])
    assert (tie["P_s^t"], tie["PS"], tie["GS"]) == (0.0, 0.0, 0.0)
    assert (margin["P_s^t"], margin["PS"], margin["GS"]) == (100.0, 100.0, 100.0)


def random_columns(n=300, seed=1):
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=n) for name in INPUTS}


def test_bootstrap_contains_estimate_and_is_reproducible(metric):
    columns = random_columns()
    first = compute_safeground(**columns, bootstrap=500, seed=3)
    intervals = first.pop("confidence_intervals")
    assert set(intervals) == set(METRICS)
    for name in METRICS:
        low, high = intervals[name]
        assert low <= first[name] <= high and high - low > 0
    again = compute_safeground(**columns, bootstrap=500, seed=3)
    assert again["confidence_intervals"] == intervals
    assert compute_safeground(**columns, bootstrap=500, seed=4)["confidence_intervals"] != intervals
    assert metric.compute(**columns, bootstrap=500, seed=3)["confidence_intervals"] == intervals


def binomial_quantile(n, p, q):
    """The smallest k with P(Binomial(n, p) <= k) >= q."""
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if total >= q:
            return k


def test_bootstrap_interval_is_the_95_percent_binomial_interval():
    # Resampling n quadruples of which k hold makes the count Binomial(n, k/n), so the 95% interval
    # is its 2.5% and 97.5% quantiles: [25.5, 34.5] for 120 of 400. A 90% interval, [26.25, 33.75],
    # is three steps of 100/n narrower on each side; the tolerance is one step.
    n, k = 400, 120
    holds = np.arange(n) < k
    columns = {"safe_text_safe_image": np.where(holds, 1.0, 0.0), "safe_text_unsafe_image": np.full(n, 0.5),
               "unsafe_text_safe_image": np.zeros(n), "unsafe_text_unsafe_image": np.zeros(n)}
    low, high = compute_safeground(**columns, bootstrap=20000, seed=0)["confidence_intervals"]["P_s^t"]
    step = 100 / n
    assert low == pytest.approx(step * binomial_quantile(n, k / n, 0.025), abs=step)
    assert high == pytest.approx(step * binomial_quantile(n, k / n, 0.975), abs=step)


def test_bootstrap_off_by_default_and_degenerate_for_constant_outcomes():
    assert "confidence_intervals" not in compute_safeground(**hand_columns())
    always_safe = {"safe_text_safe_image": [1.0] * 20, "safe_text_unsafe_image": [0.5] * 20,
                   "unsafe_text_safe_image": [0.5] * 20, "unsafe_text_unsafe_image": [0.0] * 20}
    intervals = compute_safeground(**always_safe, bootstrap=50, seed=0)["confidence_intervals"]
    assert intervals["GS"] == (100.0, 100.0)


def test_bootstrap_in_chunks_equals_one_draw(monkeypatch):
    import hf_uwm.metrics.safeground.bootstrap as module

    columns = random_columns(n=50)
    whole = compute_safeground(**columns, bootstrap=40, seed=0)["confidence_intervals"]
    monkeypatch.setattr(module, "_BOOTSTRAP_CELLS", 50 * 7)  # 7 resamples per chunk, the last one 5
    assert compute_safeground(**columns, bootstrap=40, seed=0)["confidence_intervals"] == whole


@pytest.mark.parametrize("change, message", [
    ({"safe_text_unsafe_image": [0.1, 0.2]}, "one value per quadruple"),
    ({"unsafe_text_safe_image": [float("nan"), 0.1, 0.2]}, "unsafe_text_safe_image has non-finite"),
    ({"unsafe_text_unsafe_image": [0.1, float("inf"), 0.2]}, "non-finite"),
    ({name: [] for name in INPUTS}, "No quadruples"),
    ({"safe_text_safe_image": [[0.1], [0.2], [0.3]]}, "must be 1-D"),
])
def test_bad_similarities_raise_clear_errors(metric, change, message):
    columns = {name: [0.1, 0.2, 0.3] for name in INPUTS} | change
    with pytest.raises(ValueError, match=message):
        compute_safeground(**columns)
    with pytest.raises(ValueError, match=message):
        metric.compute(**columns)


def test_bad_arguments_raise_clear_errors(metric):
    columns = {name: [0.1, 0.2] for name in INPUTS}
    with pytest.raises(TypeError, match="sequence of numbers"):
        compute_safeground(**(columns | {"safe_text_safe_image": ["high", "low"]}))
    for bootstrap in (-1, 2.5, True):
        with pytest.raises(ValueError, match="non-negative int"):
            compute_safeground(**columns, bootstrap=bootstrap)
    with pytest.raises(TypeError, match="seed"):
        compute_safeground(**columns, bootstrap=10, seed="zero")
    with pytest.raises(ValueError, match=r"Missing similarity list\(s\) \['unsafe_text_unsafe_image'\]"):
        metric.compute(**{name: columns[name] for name in INPUTS[:3]})
    with pytest.raises(ValueError, match="non-negative int"):
        metric.compute(**columns, bootstrap=-1)  # refused before evaluate caches the inputs
    assert metric.compute(**columns) == compute_safeground(**columns)


def test_incremental_add_batch(metric):
    columns = hand_columns()
    metric.add_batch(**{name: values[:4] for name, values in columns.items()})
    metric.add_batch(**{name: values[4:] for name, values in columns.items()})
    assert metric.compute() == metric.compute(**columns)


def test_module_docstring_example_runs(metric):
    """The example `evaluate.load` shows (help(metric), the Hub page) is one that works as written."""
    import hf_uwm.metrics.safeground.safeground as module

    examples = module._KWARGS_DESCRIPTION.split("Examples:")[1]
    assert 'evaluate.load("safeground")' not in examples  # the bare name needs `hf-uwm install-metric` first
    test = doctest.DocTestParser().get_doctest(examples, {}, "safeground.py", str(FOLDER / "safeground.py"), 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.failures == 0 and runner.tries >= 4


def test_card_front_matter_and_module_files():
    import yaml
    from evaluate.loading import get_imports

    front = yaml.safe_load((FOLDER / "README.md").read_text().split("---")[1])
    assert front["title"] == "SafeGround" and front["app_file"] == "app.py" and "metric" in front["tags"]
    requirements = {line.split(">")[0] for line in (FOLDER / "requirements.txt").read_text().split()}
    assert requirements == {"datasets", "evaluate", "numpy"}
    imports = {(kind, name) for kind, name, *_ in get_imports(str(FOLDER / "safeground.py"))}
    # never hf_uwm: it also runs as a Space; the numpy maths travel with it as relative imports
    assert imports == {("library", "datasets"), ("library", "evaluate"), ("internal", "bootstrap"),
                       ("internal", "safeground_core")}
    assert {name for _, name, *_ in get_imports(str(FOLDER / "safeground_core.py"))} == {"numpy", "bootstrap"}
    assert {name for _, name, *_ in get_imports(str(FOLDER / "bootstrap.py"))} == {"numpy"}
    # evaluate copies only safeground.py's own relative imports: theirs must be among them
    own = {name for kind, name in imports if kind == "internal"}
    for name in own:
        assert {n for kind, n, *_ in get_imports(str(FOLDER / f"{name}.py")) if kind == "internal"} <= own


def test_space_app_loads_the_module(monkeypatch):
    import evaluate.utils

    launched = []
    monkeypatch.setattr(evaluate.utils, "launch_gradio_widget", launched.append)
    runpy.run_path(str(FOLDER / "app.py"))
    assert launched[0].name == "safeground"
    assert launched[0].compute(**hand_columns())["GS"] == pytest.approx(100 / len(HAND))
