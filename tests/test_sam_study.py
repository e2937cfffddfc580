"""Question 3.10's SAM study: the committed runs are the runs its design describes.

The design (results/sam_variant_design.json, committed before the runs) fixes the arms, seeds and epochs and
says that early stopping is off: every epoch trained, the last one kept. Each run's cache record states what
actually happened (its configuration, epochs run, epoch kept). A record that contradicts the design fails
here, so the notebook's protocol sentence, rendered from the same records, cannot describe other runs."""

import copy
import json
import subprocess

import pytest

from conftest import REPO_ROOT

DESIGN_PATH = REPO_ROOT / "results" / "sam_variant_design.json"
CACHE = REPO_ROOT / "results" / "cache"


def slug(arm):
    """An arm's runs' name stem, as study_entry in the notebook makes it: its `entry`, else its label."""
    return "".join(ch if ch.isalnum() else "_" for ch in arm.get("entry", arm["label"]))


def entry(arm, seed):
    """The cache entry of one run, as the notebook names it (study_entry)."""
    return f"sam_variant/Part3_Sec3_10_{slug(arm)}_seed{seed}"


def committed_records(design):
    """{entry name: record} of every run the design asks for that has a record in results/cache/."""
    records = {}
    for arm in design["arms"]:
        for seed in design["seeds"]:
            path = CACHE / f"{entry(arm, seed)}.json"
            if path.exists():
                records[entry(arm, seed)] = json.loads(path.read_text())
    return records


def protocol_problems(design, records):
    """One line per way the records depart from the design: a run missing, cut short, keeping an earlier
    epoch, trained with early stopping, another SAM setting, seed or length than its arm's."""
    problems = []
    for arm in design["arms"]:
        for seed in design["seeds"]:
            name = entry(arm, seed)
            record = records.get(name)
            if record is None:
                problems.append(f"{name}: no record")
                continue
            config = record["key_parts"]["config"]
            if record["epochs_run"] != arm["epochs"] or config["fit_num_epochs"] != arm["epochs"]:
                problems.append(f"{name}: ran {record['epochs_run']} of {arm['epochs']} epochs")
            if record["best_epoch"] not in (None, record["epochs_run"]):
                problems.append(f"{name}: kept epoch {record['best_epoch']}, not the last")
            if config.get("early_stopping") is not None:
                problems.append(f"{name}: trained with early stopping {config['early_stopping']}")
            if config.get("sam") != arm["sam"]:
                problems.append(f"{name}: SAM {config.get('sam')} where the design says {arm['sam']}")
            if config.get("seed") != seed:
                problems.append(f"{name}: seed {config.get('seed')}, not {seed}")
    return problems


@pytest.fixture(scope="module")
def design():
    return json.loads(DESIGN_PATH.read_text())


def test_the_design_sets_each_contender_against_plain_training_at_its_compute(design):
    assert len(design["seeds"]) == 3
    plain = {arm["label"]: arm["epochs"] for arm in design["arms"] if arm["kind"] == "plain"}
    ratio = design["compute"]["ratio_to_plain"]
    assert design["base_epochs"] in plain.values()
    contenders = [arm for arm in design["arms"] if arm["kind"] != "plain"]
    assert {arm["kind"] for arm in contenders} == {"SAM", "variant"}
    for arm in contenders:
        assert plain[arm["baseline"]] == round(arm["epochs"] * ratio[arm["cost"]])  # equal measured compute
    assert len({slug(arm) for arm in design["arms"]}) == len(design["arms"])  # no two arms share runs


def test_every_committed_run_follows_the_design(design):
    assert protocol_problems(design, committed_records(design)) == []


@pytest.mark.parametrize(
    "fault, expected",
    [
        (lambda r: r.update(epochs_run=r["epochs_run"] - 3), "ran"),
        (lambda r: r.update(best_epoch=2), "kept epoch 2"),
        (lambda r: r["key_parts"]["config"].update(early_stopping={"patience": 3}), "early stopping"),
        (lambda r: r["key_parts"]["config"].update(sam=None), "SAM None"),
    ],
    ids=["cut-short", "earlier-epoch", "early-stopping", "other-arm"],
)
def test_a_record_that_contradicts_the_design_is_caught(design, fault, expected):
    records = copy.deepcopy(committed_records(design))
    name = entry(design["arms"][-1], design["seeds"][0])
    fault(records[name])
    problems = protocol_problems(design, records)
    assert len(problems) == 1 and problems[0].startswith(name) and expected in problems[0]


def test_each_arm_was_designed_before_its_runs():
    """`git log`: for every arm of the design, the first commit of the design file that holds the arm (its
    label, runs and epochs) comes before the commit that added the arm's first run record; the rule has never
    changed."""

    def git(*args):
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip("not a git checkout")
        return out.stdout

    def commits(*args):
        return git("log", "--format=%H", *args).split()[::-1]  # oldest first

    design_commits = commits("--", "results/sam_variant_design.json")
    runs_added = commits("--diff-filter=A", "--", "results/cache/sam_variant")
    if not design_commits or not runs_added:
        pytest.skip("a checkout without the history of the study (e.g. a shallow clone)")
    history = commits()
    designs = [(c, json.loads(git("show", f"{c}:results/sam_variant_design.json"))) for c in design_commits]
    design = designs[-1][1]
    for arm in design["arms"]:
        held = [
            c
            for c, d in designs
            if any(slug(a) == slug(arm) and a["epochs"] == arm["epochs"] for a in d["arms"])
        ]
        added = commits(
            "--diff-filter=A", "--", f"results/cache/sam_variant/Part3_Sec3_10_{slug(arm)}_seed*.json"
        )
        if added:
            assert history.index(held[0]) < history.index(added[0]), arm["label"]
    assert all(d["rule"] == design["rule"] for _, d in designs)
