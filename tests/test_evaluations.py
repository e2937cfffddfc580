"""experiments.EvaluationCache (what is measured on trained models, computed once and reused while its key
matches) and the model-file digests of ExperimentCache's entries.

The staleness test runs a small script twice in fresh interpreters on a copy of the library, the second time
with one attack's code changed, and checks that exactly the evaluations reaching that attack are stale and
computed again."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import attacks
from conftest import REPO_ROOT
from experiments import (
    EvaluationCache,
    ExperimentCache,
    decode,
    encode,
    evaluation_report,
    fresh_switch,
)
from test_experiments import library_copy, tiny_data, tiny_net

CALLS = []  # what counted_mean computed, to see which calls ran


def counted_mean(x, scale=1.0):
    """The mean of x times scale; records each call in CALLS."""
    CALLS.append(scale)
    return float(np.mean(x) * scale)


def broken_half_way(x):
    raise RuntimeError("interrupted")


def tiny_model(seed=0):
    """A seeded (8, 8, 3) -> 3 softmax classifier: the same weights in every process."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def tiny_images(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, 8, 8, 3)).astype("float32"), rng.integers(0, 3, n)


# ------------------------------------------------------------------------------------------------
# Reuse, memo, corrupt and interrupted records
# ------------------------------------------------------------------------------------------------
def test_an_evaluation_is_computed_once_then_read_back(tmp_path):
    x = np.arange(10.0)
    CALLS.clear()
    first = EvaluationCache(tmp_path, "t")
    assert first(counted_mean, x, scale=2.0) == 9.0
    assert first(counted_mean, x, scale=2.0) == 9.0  # asked twice in one process: computed once
    assert CALLS == [2.0] and len(first.computed) == 1 and first.reused == []
    second = EvaluationCache(tmp_path, "t")
    assert second(counted_mean, x, scale=2.0) == 9.0 and CALLS == [2.0]  # read back, not computed
    assert second.reused == first.computed and second.computed == []
    assert second(counted_mean, x, scale=3.0) == 13.5 and CALLS == [2.0, 3.0]  # another argument: computed
    assert second(counted_mean, x + 1, scale=2.0) == 11.0 and len(CALLS) == 3  # other data: computed
    result, evaluation = EvaluationCache(tmp_path, "t").evaluate(counted_mean, x, scale=2.0)
    assert evaluation.reused and evaluation.seconds >= 0 and evaluation.computed_at and result == 9.0


def test_force_computes_again(tmp_path):
    x = np.arange(4.0)
    CALLS.clear()
    EvaluationCache(tmp_path, "t")(counted_mean, x)
    EvaluationCache(tmp_path, "t", force=True)(counted_mean, x)
    assert len(CALLS) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong key", "bad array"])
def test_a_damaged_record_is_computed_again_never_trusted(damage, tmp_path):
    x = np.arange(6.0)
    cache = EvaluationCache(tmp_path, "t")
    cache(counted_mean, x)
    (path,) = (tmp_path / "results" / "evaluations").rglob("*.json")
    text = path.read_text()
    record = json.loads(text)
    if damage == "garbage":
        path.write_text("not json")
    elif damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "wrong key":
        record["key"] = "0" * 64
        record["result"] = 99.0
        path.write_text(json.dumps(record))
    else:
        record["result"] = {"__ndarray__": "float64", "shape": [3], "data": "AAAA"}
        path.write_text(json.dumps(record))
    CALLS.clear()
    again = EvaluationCache(tmp_path, "t")
    assert again(counted_mean, x) == 2.5 and len(CALLS) == 1 and again.computed
    assert json.loads(path.read_text())["result"] == 2.5  # the record is whole again


def test_an_interrupted_evaluation_leaves_no_record(tmp_path):
    with pytest.raises(RuntimeError):
        EvaluationCache(tmp_path, "t")(broken_half_way, np.arange(3.0))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_an_argument_the_key_cannot_see_is_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot describe"):
        EvaluationCache(tmp_path, "t")(counted_mean, np.arange(3.0), scale=object())


def test_the_fresh_switch():
    assert fresh_switch("") == (False, False)
    assert fresh_switch("evaluations") == (False, True)
    assert fresh_switch("all") == (True, True)
    with pytest.raises(ValueError, match=r"FRESH='everything'; allowed: '', 'evaluations', 'all'"):
        fresh_switch("everything")


def test_results_round_trip_exactly(tmp_path):
    value = {
        "mask": np.array([True, False, True] * 7),
        "floats": np.linspace(0, 1, 7, dtype=np.float32).reshape(7, 1),
        "scalar": np.float32(0.1),
        "pair": (1, [2.5, None, "x"]),
        "nested": [{"eps": 0.0313, "pgd": 0.386}],
    }
    back = decode(json.loads(json.dumps(encode(value, save=None))), tmp_path)
    assert back["mask"].dtype == bool and np.array_equal(back["mask"], value["mask"])
    assert back["floats"].dtype == np.float32 and np.array_equal(back["floats"], value["floats"])
    assert type(back["scalar"]) is np.float32 and back["scalar"] == value["scalar"]
    assert back["pair"] == value["pair"] and back["nested"] == value["nested"]
    with_tuple_keys = {(0.0313, 0.002): 1.0}
    assert decode(json.loads(json.dumps(encode(with_tuple_keys, save=None))), tmp_path) == with_tuple_keys


def test_a_model_in_a_result_is_saved_and_checked(tmp_path):
    """A training run through the cache (Part 2's use): its network is saved beside the record and loaded
    back, refused when the file is changed."""
    cache = EvaluationCache(tmp_path, "t")
    model = cache(tiny_model, 3)
    again = EvaluationCache(tmp_path, "t")
    loaded = again(tiny_model, 3)
    assert again.reused and all(
        np.array_equal(a, b) for a, b in zip(model.get_weights(), loaded.get_weights())
    )
    (saved,) = (tmp_path / "models").rglob("*.h5")
    assert evaluation_report(tmp_path) == [(again.reused[0], [])]
    saved.write_bytes(saved.read_bytes()[:-100])
    ((name, reasons),) = evaluation_report(tmp_path)
    assert reasons == [f"model file {saved.relative_to(tmp_path)} missing or changed"]
    third = EvaluationCache(tmp_path, "t")
    third(tiny_model, 3)
    assert third.computed and not third.reused  # trained again, not loaded from the damaged file


def test_a_model_argument_counts_by_its_weights(tmp_path):
    x, y = tiny_images()
    cache = EvaluationCache(tmp_path, "t")
    a = cache(attacks.robust_correct, tiny_model(0), x, y, None)
    b = cache(attacks.robust_correct, tiny_model(0), x, y, None)  # another object, the same weights
    c = cache(attacks.robust_correct, tiny_model(1), x, y, None)
    assert len(cache.computed) == 2 and np.array_equal(a, b) and a.dtype == c.dtype == bool


# ------------------------------------------------------------------------------------------------
# A changed attack makes exactly the evaluations that reach it stale
# ------------------------------------------------------------------------------------------------
SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {library!r})
    sys.path.insert(1, {tests!r})
    import attacks
    from experiments import EvaluationCache
    from test_evaluations import tiny_images, tiny_model

    cache = EvaluationCache({folder!r}, "t")
    stale = [name for name, reasons in cache.check() if reasons]
    model, (x, y) = tiny_model(), tiny_images()
    for attack, settings in [(attacks.fgsm_attack, {{}}), (attacks.pgd_attack, dict(k=3)), (None, {{}})]:
        cache(attacks.robust_correct, model, x, y, attack, **settings)
    print(json.dumps(dict(stale=stale, computed=cache.computed, reused=cache.reused)))
    """
)


def run_script(library, folder):
    script = SCRIPT.format(library=str(library), tests=str(REPO_ROOT / "tests"), folder=str(folder))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def halve_fgsm(name, text):
    """A real change of FGSM alone: its step is halved."""
    old = 'return _compiled(model)["fgsm"](x, y, float(eps))'
    assert name != "attacks.py" or old in text
    return text.replace(old, 'return _compiled(model)["fgsm"](x, y, float(eps) / 2)')


@pytest.mark.slow
def test_a_changed_attack_makes_exactly_its_evaluations_stale(tmp_path):
    results = tmp_path / "results"
    first = run_script(library_copy(tmp_path / "before"), results)
    assert first["stale"] == [] and len(first["computed"]) == 3 and first["reused"] == []
    fgsm, pgd, clean = first["computed"]
    after = run_script(library_copy(tmp_path / "after", halve_fgsm), results)
    assert after["stale"] == [fgsm]  # `check` names the one evaluation that reaches fgsm_attack
    assert after["computed"] == [fgsm] and sorted(after["reused"]) == sorted([pgd, clean])
    again = run_script(tmp_path / "after", results)
    assert again["stale"] == [] and again["computed"] == [] and len(again["reused"]) == 3


# ------------------------------------------------------------------------------------------------
# ExperimentCache: a model file is checked, not trusted
# ------------------------------------------------------------------------------------------------
def test_a_damaged_or_swapped_model_file_is_reported_and_refused(tmp_path):
    data = tiny_data()
    cache = ExperimentCache(tmp_path, data)
    for name, seed in [("a", 1), ("b", 2), ("c", 3)]:
        cache.fit(tiny_net(seed=seed), name)
    models = {name: tmp_path / "models" / f"{name}.h5" for name in "abc"}
    models["a"].write_bytes(models["a"].read_bytes()[:1000])  # truncated
    b, c = models["b"].read_bytes(), models["c"].read_bytes()
    models["b"].write_bytes(c)  # swapped: each a valid model with another entry's weights
    models["c"].write_bytes(b)
    report = dict(ExperimentCache(tmp_path, data).check())
    for name in "abc":
        (reason,) = report[name]
        assert reason.startswith("model file changed") and str(models[name]) in reason
        with pytest.raises(ValueError) as info:
            ExperimentCache(tmp_path, data).fit(tiny_net(seed=" abc".index(name)), name)
        assert "damaged or replaced" in str(info.value) and "\n" not in str(info.value)
