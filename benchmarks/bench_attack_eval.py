"""The attack evaluation of the Part 3 notebook, before and after it moved into the library (run by hand).

For each model the notebook attacks (the best clean model of 3.8, the adversarially trained model of
3.9, the SAM model of 3.10), on the 500 test images, with the notebook's full-profile settings:

- **before**: the evaluation as the notebook at commit 8436b95 ran it: every attack on every test image
  (``attacks.robust_correct``), PGD-100 from scratch, each random restart on every image, and the eps
  curve with every attack at every eps, eps = 0 included;
- **after**: ``attacks.evaluate_robustness`` and ``attacks.eps_curve``, which share the clean pass and
  attack only the images that can still count as robust.

The two are run alternately per model (before, then after), so that other load on the machine affects
both alike; the random restarts are seeded identically (``tf.random.set_seed(1234)`` before each).
Prints both timings, their ratio, and whether every figure is identical (and equal to results/part3.json).
"Identical" compares the figures both compute; "after" adds the worst case of 3.8 and 3.10, and counts a
clean mistake as never robust (see ``attacks.evaluate_robustness``), so a figure can only differ where
an attack turned a wrong clean prediction into a right one. ``--before-from`` reuses the "before" half
of an earlier run's JSON (same machine) instead of running it again.

    .venv/bin/python benchmarks/bench_attack_eval.py [--out runs/bench_attack_eval.json] [--before-from F]
"""

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import attacks  # noqa: E402
import experiments  # noqa: E402

EPS, ETA, K, STRONG_K, RESTARTS = 0.0313, 0.002, 20, 100, 5
EPS_CURVE = [0.0, 0.004, 0.008, 0.0157, 0.0313, 0.047, 0.0627]


def before(model, x, y, full):
    """The notebook's evaluation at 8436b95 (cells evaluate_attacks, eps_curve, the 3.9 evaluation)."""
    masks = {"clean": attacks.robust_correct(model, x, y, None)}
    masks["fgsm"] = attacks.robust_correct(model, x, y, attacks.fgsm_attack, eps=EPS)
    masks["pgd"] = attacks.robust_correct(model, x, y, attacks.pgd_attack, eps=EPS, k=K, eta=ETA)
    masks["mim"] = attacks.robust_correct(model, x, y, attacks.mim_attack, eps=EPS, k=K, eta=ETA)
    out = {name: float(mask.mean()) for name, mask in masks.items()}
    if full:
        strong = attacks.robust_correct(model, x, y, attacks.pgd_attack, eps=EPS, k=STRONG_K, eta=ETA)
        survived = np.ones(len(y), dtype=bool)
        tf.random.set_seed(1234)
        for restart in range(RESTARTS):
            survived &= attacks.robust_correct(
                model, x, y, attacks.pgd_attack, eps=EPS, k=K, eta=ETA, random_start=True, seed=restart
            )
        out.update(pgd_strong=float(strong.mean()), pgd_random_restarts=float(survived.mean()))
        out["worst_case"] = float((masks["fgsm"] & masks["pgd"] & masks["mim"] & strong & survived).mean())
    if full is not None:
        rows = []
        for eps in EPS_CURVE:
            eta = max(ETA, 2.5 * eps / K)
            rows.append(
                dict(
                    eps=eps,
                    fgsm=attacks.robust_accuracy(model, x, y, attacks.fgsm_attack, eps=eps),
                    pgd=attacks.robust_accuracy(model, x, y, attacks.pgd_attack, eps=eps, k=K, eta=eta),
                    mim=attacks.robust_accuracy(model, x, y, attacks.mim_attack, eps=eps, k=K, eta=eta),
                )
            )
        out["eps_curve"] = rows
    return out


def after(model, x, y, full):
    tf.random.set_seed(1234)
    out, masks = attacks.evaluate_robustness(
        model,
        x,
        y,
        eps=EPS,
        k=K,
        eta=ETA,
        strong_k=STRONG_K if full else None,
        restarts=RESTARTS if full else 0,
    )
    if full is not None:
        out["eps_curve"] = attacks.eps_curve(model, x, y, EPS_CURVE, k=K, eta=ETA, clean=masks["clean"])
    return out


def same_figures(before, after):
    """True when every figure ``before`` has is equal in ``after`` (eps curves row by row)."""
    return all(after.get(key) == value for key, value in before.items())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "bench_attack_eval.json"))
    parser.add_argument(
        "--before-from", default=None, help="an earlier run's JSON whose 'before' half to reuse"
    )
    args = parser.parse_args()
    earlier = (
        {r["model"]: r for r in json.loads(Path(args.before_from).read_text())["report"]}
        if args.before_from
        else {}
    )
    with contextlib.redirect_stdout(io.StringIO()):
        data = experiments.animals_data()
    x, y = data.X_test, data.y_test
    recorded = json.loads((REPO_ROOT / "results" / "part3.json").read_text())
    cases = [  # model, full (True: 3.9's strong attacks and restarts; False: eps curve only; None: neither)
        ("3.8 best clean", recorded["attacks"]["model"], False, recorded["attacks"]),
        ("3.9 adversarially trained", recorded["adversarial"]["model"], True, recorded["adversarial"]),
        ("3.10 SAM", recorded["sam"]["model"], None, recorded["sam"]["robust"]),
    ]
    report, totals = [], {"before": 0.0, "after": 0.0}
    for label, path, full, expected in cases:
        model = keras.models.load_model(REPO_ROOT / path, compile=False)
        attacks.fgsm_attack(model, x[:2], y[:2])  # compile outside the timings
        attacks.pgd_attack(model, x[:2], y[:2], k=1)
        attacks.mim_attack(model, x[:2], y[:2], k=1)
        row = {"model": label}
        for name, fn in (("before", before), ("after", after)):
            if name == "before" and label in earlier:
                row["before"], row["before_seconds"] = (
                    earlier[label]["before"],
                    earlier[label]["before_seconds"],
                )
            else:
                started = time.perf_counter()
                row[name] = fn(model, x, y, full)
                row[f"{name}_seconds"] = time.perf_counter() - started
            totals[name] += row[f"{name}_seconds"]
        row["identical"] = same_figures(row["before"], row["after"])
        row["as_recorded"] = all(row["after"][k] == v for k, v in expected.items() if k in row["after"])
        report.append(row)
        print(
            f"{label}: before {row['before_seconds']:.1f} s, after {row['after_seconds']:.1f} s "
            f"({row['after_seconds'] / row['before_seconds']:.2f}x); identical figures: {row['identical']}; "
            f"equal to results/part3.json: {row['as_recorded']}",
            flush=True,
        )
        if not row["identical"]:
            print("  before:", row["before"], "\n  after: ", row["after"])
    print(
        f"total: before {totals['before']:.1f} s, after {totals['after']:.1f} s "
        f"({totals['after'] / totals['before']:.2f}x), load average {os.getloadavg()[0]:.1f}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(report=report, totals=totals, load=os.getloadavg()), indent=1))


if __name__ == "__main__":
    main()
