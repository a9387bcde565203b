"""`evaluate.load("safeground")` before and after `hf-uwm install-metric`, in a fresh process.

evaluate reads HF_MODULES_CACHE when it is imported, so tests run this with their own cache (and
offline). Prints one JSON line: the error before, what the command printed, both loads' results on
tie-heavy inputs, the file the bare name loaded, and the metric card's doctests.
"""

import contextlib
import doctest
import inspect
import io
import json
import os
import re
from pathlib import Path

import numpy as np

import evaluate
from hf_uwm.cli import main
from hf_uwm.metrics import safeground_path

out = {"installed_on_import": (Path(os.environ["HF_MODULES_CACHE"]) / "evaluate_modules" / "metrics"
                               / "evaluate-metric--safeground").exists()}
try:
    evaluate.load("safeground")
except Exception as err:  # evaluate's own error, whatever its type
    out["before"] = f"{type(err).__name__}: {err}"
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    out["rc"] = main(["install-metric"])
out["printed"] = printed.getvalue()

verbatim, folder = evaluate.load("safeground"), evaluate.load(safeground_path())
out["loaded_from"] = inspect.getfile(type(verbatim))
# similarities on a coarse grid: about a third of the comparisons are exact ties
columns = {name: (np.random.default_rng(k).integers(0, 3, size=400) / 2).tolist()
           for k, name in enumerate(("safe_text_safe_image", "safe_text_unsafe_image", "unsafe_text_safe_image",
                                     "unsafe_text_unsafe_image"))}
out["columns"] = columns
out["verbatim"] = verbatim.compute(**columns, bootstrap=200, seed=0)
out["folder"] = folder.compute(**columns, bootstrap=200, seed=0)

card = (Path(safeground_path()) / "README.md").read_text()
test = doctest.DocTestParser().get_doctest("\n".join(re.findall(r"```python\n(.*?)```", card, flags=re.S)), {},
                                           "safeground/README.md", None, 0)
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
report = io.StringIO()
runner.run(test, out=report.write)
out["card"] = {"tries": runner.tries, "failures": runner.failures, "report": report.getvalue()}
print(json.dumps(out))
