"""attacks.py's APGD-CE and APGD-T (AutoAttack's gradient attacks, through ART 1.20.1).

- Properties: every point returned lies in the eps ball and in [-1, 1]; a seed gives the same points.
- Strength: on a small trained network, APGD (100 iterations) leaves at most as many images right as
  PGD-20 from the clean image, up to a tolerance.
- The DLR loss that ART's estimator computes against Croce & Hein's formula written here in numpy, on
  random logits (a softmax model on K inputs has the inputs as its logits), untargeted and targeted.
- Where stock ART departs from AutoAttack (see the comment above ``attacks.dlr_loss``): its targeted
  "DLR" is a different function, flat when the target ranks third; its targeted mode misses an image
  pushed into a class other than the target, which APGD-T counts.

The network is a small YourModel trained for 3 epochs on synthetic 16x16 images of 5 classes (DLR
needs 4 or more), made as in test_attacks_regularizers.py: a weak pattern that a perturbation of
eps = 0.0313 can erase, plus a strong patch marking the class in 70% of the images.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tensorflow import keras  # noqa: E402

import attacks  # noqa: E402
from conftest import attacked_net  # noqa: E402
from models import AnimalsDatasetManager  # noqa: E402

EPS, ITERATIONS = 0.0313, 100
SIZE, CLASSES = 16, 5
TOLERANCE = 0.02  # APGD may leave this fraction of the images more right than PGD-20 does


def synthetic(n, seed, weak=0.06, patch=0.3, reliability=0.7, noise=0.3):
    """(n, 16, 16, 3) float32 images in [-1, 1] and (n,) labels in {0, ..., 4}."""
    templates = np.random.RandomState(0).choice([-1.0, 1.0], size=(CLASSES, SIZE, SIZE, 3))
    rng = np.random.RandomState(seed)
    y = rng.randint(0, CLASSES, n)
    x = weak * templates[y] + noise * rng.randn(n, SIZE, SIZE, 3)
    marked = np.where(rng.rand(n) < reliability, y, rng.randint(0, CLASSES, n))
    for i, c in enumerate(marked):
        x[i, 2:5, 1 + 3 * c : 4 + 3 * c, :] += patch
    return np.clip(x, -1, 1).astype(np.float32), y


@pytest.fixture(scope="module")
def data():
    manager = AnimalsDatasetManager()
    manager.X_train, manager.y_train = synthetic(600, seed=1)
    manager.X_valid, manager.y_valid = synthetic(150, seed=2)
    return manager


@pytest.fixture(scope="module")
def model(data):
    """The attack tests' small YourModel (``conftest.attacked_net``: 2 blocks, BN), trained clean 3 epochs."""
    net = attacked_net(num_classes=CLASSES, num_epochs=3)
    net.build_cnn()
    net.fit(data)
    return net.model


@pytest.fixture(scope="module")
def batch(data):
    return data.X_valid[:100], data.y_valid[:100]


def random_images(seed, n):
    """(n, 16, 16, 3) images, a third of the pixels saturated at -1 or 1 (where clipping binds)."""
    rng = np.random.RandomState(seed)
    x = rng.uniform(-1, 1, (n, SIZE, SIZE, 3))
    mask = rng.rand(*x.shape) < 0.3
    x[mask] = rng.choice([-1.0, 1.0], size=int(mask.sum()))
    return x.astype(np.float32), rng.randint(0, CLASSES, n)


APGD = {
    "apgd_ce": dict(loss="ce"),
    "apgd_dlr": dict(loss="dlr"),
    "apgd_t": dict(loss="dlr", targeted=True, targets=CLASSES - 1),
}


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(APGD))
@settings(max_examples=4, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), eps=st.floats(0.001, 0.1))
def test_apgd_stays_in_eps_ball_and_pixel_range(model, name, seed, n, eps):
    x, y = random_images(seed, n)
    adv = attacks.apgd_attack(model, x, y, eps=eps, iterations=10, seed=seed, **APGD[name])
    assert adv.shape == x.shape and adv.dtype == np.float32
    assert np.max(np.abs(adv - x)) <= eps + 1e-6
    assert adv.min() >= -1.0 and adv.max() <= 1.0


@pytest.mark.slow
def test_apgd_is_seeded_and_leaves_numpy_global_state_alone(model, batch):
    x, y = batch[0][:20], batch[1][:20]
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = attacks.apgd_attack(model, x, y, eps=EPS, iterations=10, seed=7)
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    np.testing.assert_array_equal(attacks.apgd_attack(model, x, y, eps=EPS, iterations=10, seed=7), first)
    other = attacks.apgd_attack(model, x, y, eps=EPS, iterations=10, seed=8)
    assert not np.array_equal(other, first)


# ------------------------------------------------------------------------------------------------
# Strength
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_apgd_at_least_as_strong_as_pgd20(model, batch):
    """Both APGD attacks leave at most TOLERANCE more of the images right than PGD-20 (eta 0.002) from the
    clean image; the model is right on most clean images and PGD-20 breaks some, so the test can fail."""
    x, y = batch
    clean = attacks.robust_correct(model, x, y, None)
    pgd = attacks.robust_correct(model, x, y, attacks.pgd_attack, eps=EPS, k=20, eta=0.002)
    assert clean.mean() >= 0.6 and pgd.mean() < clean.mean() - 0.1
    for name, options in [("apgd_ce", APGD["apgd_ce"]), ("apgd_t", APGD["apgd_t"])]:
        mask = attacks.robust_correct(
            model, x, y, attacks.apgd_attack, eps=EPS, iterations=ITERATIONS, **options
        )
        assert mask.shape == (len(x),) and mask.dtype == bool
        assert not np.any(mask & ~clean), f"{name}: robust on an image the model gets wrong clean"
        assert mask.sum() <= pgd.sum() + TOLERANCE * len(x), (
            f"{name}: {mask.mean():.2f} vs PGD-20 {pgd.mean():.2f}"
        )


# ------------------------------------------------------------------------------------------------
# The DLR loss, against Croce & Hein's formula
# ------------------------------------------------------------------------------------------------
def croce_hein_dlr(z, y, t=None):
    """Croce & Hein (2020), eq. 6 and its targeted version (Sec. 4), in numpy: -(z_y - max_{i != y} z_i)
    / (z_pi1 - z_pi3), or -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) with target t; z (N, K)."""
    out = []
    for i, row in enumerate(z.astype(np.float64)):
        s = sorted(row, reverse=True)
        if t is None:
            out.append(-(row[y[i]] - max(np.delete(row, y[i]))) / (s[0] - s[2]))
        else:
            out.append(-(row[y[i]] - row[t[i]]) / (s[0] - (s[2] + s[3]) / 2))
    return np.array(out)


def random_logits(seed, n=64, k=10):
    """(n, k) logits, labels y and targets t != y; a softmax model on k inputs has these as its logits."""
    rng = np.random.RandomState(seed)
    z = (rng.randn(n, k) * rng.uniform(0.1, 10, (n, 1))).astype(np.float32)
    y = rng.randint(0, k, n)
    t = (y + rng.randint(1, k, n)) % k
    return z, y, t


def softmax_model(k=10):
    return keras.Sequential([keras.Input((k,)), keras.layers.Activation("softmax")])


def stock_classifier():
    """ART's TensorFlowV2Classifier class (imported quietly by ``attacks._art``)."""
    attacks._art()
    from art.estimators.classification import TensorFlowV2Classifier

    return TensorFlowV2Classifier


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
def test_dlr_that_art_computes_matches_croce_hein(targeted):
    """The loss APGD maximises, as ART's estimator computes it (``compute_loss``, as APGD calls it), on
    logits given as inputs; the labels are one_hot(y), minus one_hot(t) when targeted."""
    z, y, t = random_logits(0)
    labels = np.eye(10, dtype=np.float32)[y] - (np.eye(10, dtype=np.float32)[t] if targeted else 0)
    classifier = attacks.apgd_classifier(softmax_model(), "dlr")
    ours = classifier.compute_loss(z, labels, reduction="none")
    np.testing.assert_allclose(ours, croce_hein_dlr(z, y, t if targeted else None), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", attacks.APGD_LOSSES)
def test_compiled_gradient_is_arts_gradient(loss):
    """The classifier's compiled ``loss_gradient`` equals ART's own (eager) one."""
    z, y, t = random_logits(4)
    labels = np.eye(10, dtype=np.float32)[y] - (np.eye(10, dtype=np.float32)[t] if loss == "dlr" else 0)
    classifier = attacks.apgd_classifier(softmax_model(), loss)
    ours = classifier.loss_gradient(z, labels)
    arts = stock_classifier().loss_gradient(classifier, z, labels)
    assert np.abs(arts).max() > 0
    np.testing.assert_allclose(ours, arts, rtol=1e-5, atol=1e-6)


def test_ce_that_art_computes_is_the_cross_entropy():
    z, y, _ = random_logits(1)
    classifier = attacks.apgd_classifier(softmax_model(), "ce")
    ours = classifier.compute_loss(z, np.eye(10, dtype=np.float32)[y], reduction="none")
    log_p = z - np.log(np.sum(np.exp(z.astype(np.float64)), axis=1, keepdims=True))
    np.testing.assert_allclose(ours, -log_p[np.arange(len(y)), y], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Where stock ART departs from AutoAttack (the reasons for attacks.py's fixes)
# ------------------------------------------------------------------------------------------------
def stock_apgd(model, **kwargs):
    """ART's APGD with its own DLR loss ("difference_logits_ratio"), as its documentation offers it."""
    estimator = stock_classifier()(
        model=attacks.logits_model(model),
        nb_classes=model.output_shape[-1],
        input_shape=tuple(model.input_shape[1:]),
        loss_object=keras.losses.CategoricalCrossentropy(from_logits=True),
        clip_values=(-1.0, 1.0),
    )
    return attacks._art()[0](estimator, loss_type="difference_logits_ratio", verbose=False, **kwargs)


def test_stock_art_untargeted_dlr_is_croce_hein():
    z, y, _ = random_logits(2)
    loss = stock_apgd(softmax_model(), targeted=False).estimator.compute_loss(
        z, np.eye(10, dtype=np.float32)[y], reduction="none"
    )
    np.testing.assert_allclose(loss, croce_hein_dlr(z, y), rtol=1e-5, atol=1e-6)


def test_stock_art_targeted_dlr_is_not_croce_hein():
    """ART's targeted mode minimises its untargeted DLR of the target (it flips the gradient): the
    objective -DLR(t) differs from Croce & Hein's targeted DLR, and it is the constant -1 (gradient
    rounding noise) whenever the target is the third-ranked class."""
    z, y, t = random_logits(3)
    estimator = stock_apgd(softmax_model(), targeted=True).estimator
    objective = -estimator.compute_loss(z, np.eye(10, dtype=np.float32)[t], reduction="none")
    assert np.mean(np.isclose(objective, croce_hein_dlr(z, y, t), rtol=1e-3)) < 0.1
    third = np.argsort(-z, axis=1)[:, 2]
    third_hot = np.eye(10, dtype=np.float32)[third]
    np.testing.assert_allclose(estimator.compute_loss(z, third_hot, reduction="none"), 1.0, rtol=1e-6)
    assert np.max(np.abs(estimator.loss_gradient(z, third_hot))) < 1e-6


def toy_model(d=100):
    """Softmax over 4 logits of x in R^d, with s = sum(x): z = (8 - 0.15 s, 7 - 0.1 s, 5 + 0.2 s, -10).

    At x = 0 the model says 0, and no point of the ball |x_j| <= 0.1 (|s| <= 10) makes it say 1 (z_1 >
    z_0 needs s > 20). Raising s, which APGD-T with target 1 does (Croce & Hein's targeted DLR rises
    with s on the whole ball), makes it say 2 once s > 8.6; a uniform random start has |s| ~ 0.6."""
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(4, activation="softmax")])
    weights = np.zeros((d, 4), np.float32)
    weights[:, 0], weights[:, 1], weights[:, 2] = -0.15, -0.1, 0.2
    model.layers[-1].set_weights([weights, np.array([8.0, 7.0, 5.0, -10.0], np.float32)])
    return model


def test_stock_art_targeted_mode_misses_a_wrong_class_other_than_the_target():
    """With target 1 (the second-ranked class), APGD-T breaks every image (the model says 2); ART's
    targeted mode, which calls an image broken only in the target class, returns its random start,
    where the model is still right."""
    model, x, y = toy_model(), np.zeros((8, 100), np.float32), np.zeros(8, dtype=int)
    ours = attacks.apgd_attack(model, x, y, eps=0.1, loss="dlr", targeted=True, targets=1)
    np.testing.assert_array_equal(np.argmax(model(ours), axis=1), 2)
    np.random.seed(0)
    attack = stock_apgd(model, targeted=True, eps=0.1, eps_step=0.2, nb_random_init=1, batch_size=8)
    theirs = attack.generate(x, np.eye(4, dtype=np.float32)[np.ones(8, dtype=int)])
    np.testing.assert_array_equal(np.argmax(model(theirs), axis=1), 0)


def test_a_run_reports_images_wrong_at_the_start_and_at_any_iterate():
    """``_apgd_run`` on the toy model: images 0-1 (x = 0) are right and broken by the walk; images 2-3
    (s = 90) are wrong at x, which ART does not attack: fooled, with x itself as their point."""
    model = toy_model()
    x = np.concatenate([np.zeros((2, 100)), np.full((2, 100), 0.9)]).astype(np.float32)
    labels = np.eye(4, dtype=np.float32)[[0, 0, 0, 0]] - np.eye(4, dtype=np.float32)[[1, 1, 1, 1]]
    classifier = attacks.apgd_classifier(model, "dlr")
    fooled, points = attacks._apgd_run(classifier, x, labels, eps=0.1, iterations=100, seed=0)
    np.testing.assert_array_equal(fooled, True)
    np.testing.assert_array_equal(points[2:], x[2:])
    np.testing.assert_array_equal(np.argmax(model(points), axis=1), 2)
    assert classifier.labels is None  # the record is closed


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eps=-0.01), "eps=-0.01"),
        (dict(eps=0.0), "eps=0.0"),
        (dict(y=np.zeros(3, dtype=int)), r"y has shape \(3,\)"),
        (dict(y=np.full(4, 10)), "labels must lie in"),
        (dict(x=np.full((4, 10), 2.0, np.float32)), "pixels must lie in"),
        (dict(x=np.zeros((4, 12), np.float32)), "x has shape"),
        (dict(loss="hinge"), "loss='hinge'"),
        (dict(loss="ce", targeted=True), "targeted DLR"),
        (dict(targeted=True, loss="dlr", targets=10), "targets=10"),
        (dict(iterations=0), "iterations=0"),
    ],
)
def test_bad_input_raises_a_clear_value_error(kwargs, message):
    arguments = dict(model=softmax_model(), x=np.zeros((4, 10), np.float32), y=np.zeros(4, dtype=int))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        attacks.apgd_attack(**arguments)


def test_dlr_needs_four_classes():
    with pytest.raises(ValueError, match="at least 4 classes"):
        attacks.apgd_attack(softmax_model(3), np.zeros((2, 3), np.float32), np.zeros(2, int), loss="dlr")
