"""The submitted candidate per condition on a generated realistic test split: a trained run's out-of-fold choice
(probabilities.json) against the same choice with its temperatures clipped below, raw or corrected only, and the
priors alone, each scored with the official metric's terms. One prediction, then only build_submission.

    python bench/choice_check.py <a training run's output folder, e.g. the Kaggle-flow test's kaggle_flow0/train>
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_demo_studies import REALISTIC, TEST_SOLUTION, make_study_set  # noqa: E402
from notebook_cells import notebook_namespace  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="output folder of a training run (fold*/final.pt, localiser.pt, probabilities.json)")
    p.add_argument("--seed", type=int, default=8)
    p.add_argument("--studies", type=int, default=8)
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    make_study_set(tmp / "data", n_studies=3, seed=a.seed, test_studies=a.studies, **REALISTIC)
    nb = notebook_namespace({"data_root": str(tmp / "data"), "output_dir": str(tmp / "out"),
                             "cache_dir": str(tmp / "cache"), "pretrained": "none", "num_workers": 1})
    cpu = torch.device("cpu")
    run = nb["load_run"](a.run, nb["CONFIG"], cpu)
    probs, _, _ = nb["predict_test"](run, nb["CONFIG"], cpu, 1)
    sample = pd.read_csv(tmp / "data" / "sample_submission.csv")
    solution = pd.read_csv(tmp / "data" / TEST_SOLUTION / "solution.csv")
    fitted = json.loads((Path(a.run) / "probabilities.json").read_text())

    def score(choice):
        terms = nb["competition_terms"](solution, nb["build_submission"](sample, probs, run["priors"], choice)[0])
        return " ".join(f"{k} {v:.3f}" for k, v in terms.items()) + f" | mean {np.mean(list(terms.values())):.3f}"

    print("as fitted         ", score(fitted))
    for low in (0.9, 1.0):
        print(f"T clipped to >= {low}", score({c: {**v, "temperature": max(v["temperature"], low)}
                                               for c, v in fitted.items()}))
    print("raw or corrected  ", score({c: min(("raw", "corrected"), key=v.get) for c, v in fitted.items()}))
    print("priors alone      ", score({c: "priors" for c in fitted}))


if __name__ == "__main__":
    main()
