"""Rewrite the results table in README.md from results/part1.json, part2.json and part3.json.

Only the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` changes. A part whose
file or key is missing shows "not yet run". Standard library only, so it runs without the virtualenv:

    python3 tools/render_readme.py [--readme README.md] [--results results]
"""

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
NOT_RUN = "not yet run"


def lookup(data, *keys):
    """``data[k0][k1]...``, or None where any level is missing."""
    for key in keys:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def fmt(value):
    """A number with four decimals (four significant digits when it is below 0.001), an integer as is,
    anything else (or nothing) as "not yet run"."""
    if isinstance(value, bool) or value is None:
        return NOT_RUN
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    return NOT_RUN


def best_by_val(rows):
    """The row of a list of result dicts with the highest ``val_acc``, or None."""
    rows = [r for r in rows or [] if isinstance(r, dict) and isinstance(r.get("val_acc"), (int, float))]
    return max(rows, key=lambda r: r["val_acc"]) if rows else None


def with_std(row):
    """ "mean ± std" of a row with ``test_acc`` and ``test_std`` (means over seeds), or None."""
    mean, std = (row or {}).get("test_acc"), (row or {}).get("test_std")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (mean, std)):
        return None
    return f"{fmt(float(mean))} ± {fmt(float(std))}"


def test_acc_at(rows, alpha):
    """The ``test_acc`` of the row of ``rows`` with this ``alpha``, or None."""
    return next(
        (r.get("test_acc") for r in rows or [] if isinstance(r, dict) and r.get("alpha") == alpha), None
    )


def table_rows(r):
    """(part, quantity, value) for the table; ``r`` maps "part1".."part3" to the loaded JSON (or {})."""
    p1, p2, p3 = r["part1"], r["part2"], r["part3"]
    best2 = lookup(p2, "best") or {}
    smoothing = lookup(p2, "label_smoothing")
    chosen = lookup(p2, "chosen_alpha")  # the notebook's choice (rounded means can tie)
    rows = [r for r in smoothing or [] if isinstance(r, dict) and r.get("alpha") == chosen]
    smooth = (rows[0] if rows else best_by_val(smoothing)) or {}
    seeds = len(best2.get("seeds") or []) or "several"
    best3 = lookup(p3, "best") or {}
    arch2 = f" ({best2['n1']}-{best2['n2']}, {best2['act']})" if {"n1", "n2", "act"} <= best2.keys() else ""
    arch3 = (
        f" ({best3['num_blocks']} blocks, skip {best3['use_skip']}, lr {best3['learning_rate']})"
        if {"num_blocks", "use_skip", "learning_rate"} <= best3.keys()
        else ""
    )
    alpha = f" (α = {smooth['alpha']})" if "alpha" in smooth else ""
    sid = lookup(p1, "q1_3", "student_id")
    sid = f" (student ID {sid})" if sid is not None else ""
    mix = lookup(p3, "mixup", "alpha")
    mix = f" (α = {mix})" if mix is not None else ""
    rho = lookup(p3, "sam", "rho")
    rho = f" (ρ = {rho}, chosen on validation)" if rho is not None else ""
    best_name = lookup(p3, "best_clean", "name")
    best_name = f" ({best_name})" if best_name else ""
    strong_k = lookup(p3, "adversarial", "pgd_strong_k")
    restarts = lookup(p3, "adversarial", "pgd_restarts")
    strong = f"PGD-{strong_k or 'k'} / PGD-20 from the clean image and {restarts or 'n'} random starts"
    return [
        ("1", "Q1.2 cross-entropy loss", lookup(p1, "q1_2", "ce_loss")),
        ("1", "Q1.2 loss with label smoothing α = 0.1", lookup(p1, "q1_2", "label_smoothing_loss")),
        ("1", f"Q1.3 predicted class{sid}", lookup(p1, "q1_3", "predicted_class")),
        ("1", "Q1.3 cross-entropy loss", lookup(p1, "q1_3", "loss")),
        ("2", "2.4 baseline 784-20-40-10, test accuracy", lookup(p2, "baseline", "test_acc")),
        (
            "2",
            f"2.5 best of the 12-run grid{arch2} by mean validation over {seeds} seeds, "
            "test accuracy (mean ± std)",
            with_std(best2),
        ),
        (
            "2",
            "2.6 label smoothing α = 0.1 / 0.15 / 0.2, test accuracy (mean over the seeds)",
            [test_acc_at(smoothing, a) for a in (0.1, 0.15, 0.2)],
        ),
        (
            "2",
            f"2.6 label smoothing, chosen by mean validation{alpha}, test accuracy (mean ± std)",
            with_std(smooth),
        ),
        ("3", "default model, test accuracy", lookup(p3, "default", "test_acc")),
        ("3", f"3.4 best of the 12-run grid{arch3}, test accuracy", best3.get("test_acc")),
        (
            "3",
            "3.6 without / with augmentation (40 epochs), test accuracy",
            [lookup(p3, "augmentation", side, "test_acc") for side in ("without", "with")],
        ),
        ("3", f"3.7 with mixup{mix}, test accuracy", lookup(p3, "mixup", "test_acc")),
        ("3", "+ weight averaging (EMA of the weights), test accuracy", lookup(p3, "recipe", "test_acc")),
        (
            "3",
            "3.8 best model: clean / FGSM / PGD / MIM accuracy",
            [lookup(p3, "attacks", k) for k in ("clean", "fgsm", "pgd", "mim")],
        ),
        (
            "3",
            "3.9 adversarially trained: clean / FGSM / PGD / MIM accuracy",
            [lookup(p3, "adversarial", k) for k in ("clean", "fgsm", "pgd", "mim")],
        ),
        (
            "3",
            f"3.9 adversarially trained: {strong} / worst case over every attack",
            [lookup(p3, "adversarial", k) for k in ("pgd_strong", "pgd_restarts_acc", "worst_case")],
        ),
        ("3", f"3.10 SAM{rho}, test accuracy", lookup(p3, "sam", "test_acc")),
        (
            "3",
            f"best clean model by validation{best_name}: test accuracy / with flip test-time augmentation",
            [lookup(p3, "best_clean", k) for k in ("test_acc", "test_acc_flip_tta")],
        ),
    ]


def render_table(results):
    lines = ["| Part | Quantity | Value |", "|---|---|---|"]
    for part, what, value in table_rows(results):
        if isinstance(value, list):
            cells = [fmt(v) for v in value]
            shown = NOT_RUN if NOT_RUN in cells else " / ".join(cells)
        elif isinstance(value, str):  # already formatted (a mean ± std)
            shown = value
        else:
            shown = fmt(value)
        lines.append(f"| {part} | {what} | {shown} |")
    lines.append("")
    lines.append("_Filled in by `tools/render_readme.py` from `results/part*.json`; do not edit by hand._")
    return "\n".join(lines)


def load_results(results_dir):
    """{"part1": dict, ...}; a missing or unreadable file gives {}."""
    loaded = {}
    for n in (1, 2, 3):
        try:
            data = json.loads((results_dir / f"part{n}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        loaded[f"part{n}"] = data if isinstance(data, dict) else {}
    return loaded


def rewrite(readme_text, table):
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme_text):
        raise SystemExit(f"README has no {START} ... {END} block to fill")
    return pattern.sub(lambda _: f"{START}\n{table}\n{END}", readme_text, count=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    text = args.readme.read_text(encoding="utf-8")
    new = rewrite(text, render_table(load_results(args.results)))
    if new != text:
        args.readme.write_text(new, encoding="utf-8")
    print(f"{args.readme}: results table {'updated' if new != text else 'unchanged'}")


if __name__ == "__main__":
    main()
