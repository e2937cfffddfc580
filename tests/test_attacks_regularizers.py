"""attacks.py and training.py: FGSM/PGD/MIM attacks, mixup, PGD adversarial training and SAM.

- Attacks are cross-checked against cleverhans 4.0.0 (tf2), given ``attacks.logits_model(net)`` as
  ``model_fn``: cleverhans's default loss is the softmax cross-entropy of the logits, the same
  objective as attacks.py's. k = 20 steps, as in the assignment.
- Properties (hypothesis): eps ball, pixel range, eps = 0, PGD at least as strong as FGSM.
- Mixup and SAM against formulas computed here in numpy; adversarial training against clean training.

The data are synthetic 16x16 images of 3 classes (``synthetic``): a weak, fully predictive pattern
(amplitude 0.06 per pixel, below 2 eps) plus a strong patch (0.3) that marks the right class in 70% of
the images. A model trained clean leans on the weak pattern, which a PGD perturbation of eps = 0.0313
erases; adversarial training shifts weight to the patch. That gives the adversarial-training test a
margin to find within two short epochs.
"""

import os

import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method  # noqa: E402
from cleverhans.tf2.attacks.momentum_iterative_method import momentum_iterative_method  # noqa: E402
from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from scipy import stats  # noqa: E402
from tensorflow import keras  # noqa: E402

import attacks  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402
from conftest import attacked_net  # noqa: E402
from models import (  # noqa: E402
    SAM,
    AdversarialTraining,
    AnimalsDatasetManager,
    CosineSchedule,
    EarlyStopping,
    InitialWeights,
    LabelSmoothing,
    Mixup,
    WeightAveraging,
    WeightDecay,
)

EPS, K, ETA = 0.0313, 20, 0.002
SIZE, CLASSES = 16, 3
PROPERTY = settings(max_examples=12, deadline=None, derandomize=True)


def synthetic(n, seed, weak=0.06, patch=0.3, reliability=0.7, noise=0.3):
    """(n, 16, 16, 3) float32 images in [-1, 1] and (n,) labels in {0, 1, 2} (see the module docstring)."""
    templates = np.random.RandomState(0).choice([-1.0, 1.0], size=(CLASSES, SIZE, SIZE, 3))
    rng = np.random.RandomState(seed)
    y = rng.randint(0, CLASSES, n)
    x = weak * templates[y] + noise * rng.randn(n, SIZE, SIZE, 3)
    marked = np.where(rng.rand(n) < reliability, y, rng.randint(0, CLASSES, n))
    for i, c in enumerate(marked):
        x[i, 2:6, 2 + 4 * c : 6 + 4 * c, :] += patch
    return np.clip(x, -1, 1).astype(np.float32), y


def manager_of(x_train, y_train, x_valid, y_valid):
    manager = AnimalsDatasetManager()
    manager.X_train, manager.y_train, manager.X_valid, manager.y_valid = x_train, y_train, x_valid, y_valid
    return manager


def net_of(**kwargs):
    """The attack tests' small network (``conftest.attacked_net``) for this module's 3 classes."""
    return attacked_net(**{"num_classes": CLASSES, **kwargs})


@pytest.fixture(scope="module")
def data():
    return manager_of(*synthetic(600, seed=1), *synthetic(150, seed=2))


@pytest.fixture(scope="module")
def clean_net(data):
    """A small YourModel (2 blocks, BN) trained clean for 2 epochs."""
    net = net_of()
    net.build_cnn()
    net.fit(data)
    return net


@pytest.fixture(scope="module")
def batch(data):
    return data.X_valid[:100], data.y_valid[:100]


# ------------------------------------------------------------------------------------------------
# Cross-check against cleverhans
# ------------------------------------------------------------------------------------------------
def assert_matches(ours, theirs, model):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    agree = np.mean(np.isclose(ours, theirs, rtol=0, atol=1e-6))
    assert agree >= 0.99, f"only {agree:.4%} of pixels agree with cleverhans"
    np.testing.assert_array_equal(
        np.argmax(model(ours, training=False), axis=1), np.argmax(model(theirs, training=False), axis=1)
    )
    return agree


def test_model_is_trained_and_attackable(clean_net, batch):
    """The cross-checks below compare attacks that actually change predictions."""
    x, y = batch
    model = clean_net.model
    clean = attacks.robust_accuracy(model, x, y, None)
    attacked = attacks.robust_accuracy(model, x, y, attacks.pgd_attack, eps=EPS, k=K, eta=ETA)
    assert clean >= 0.6
    assert attacked < clean - 0.1


def test_fgsm_matches_cleverhans(clean_net, batch):
    x, y = batch
    ours = attacks.fgsm_attack(clean_net.model, x, y, eps=EPS)
    theirs = fast_gradient_method(
        attacks.logits_model(clean_net.model),
        tf.constant(x),
        EPS,
        np.inf,
        clip_min=-1.0,
        clip_max=1.0,
        y=tf.constant(y),
    )
    assert_matches(ours, theirs, clean_net.model)


def test_pgd_matches_cleverhans(clean_net, batch):
    x, y = batch
    ours = attacks.pgd_attack(clean_net.model, x, y, eps=EPS, k=K, eta=ETA, random_start=False)
    theirs = projected_gradient_descent(
        attacks.logits_model(clean_net.model),
        tf.constant(x),
        EPS,
        ETA,
        K,
        np.inf,
        clip_min=-1.0,
        clip_max=1.0,
        y=tf.constant(y),
        rand_init=False,
    )
    assert_matches(ours, theirs, clean_net.model)


def test_mim_matches_cleverhans(clean_net, batch):
    x, y = batch
    ours = attacks.mim_attack(clean_net.model, x, y, eps=EPS, k=K, eta=ETA, decay=1.0)
    theirs = momentum_iterative_method(
        attacks.logits_model(clean_net.model),
        tf.constant(x),
        EPS,
        ETA,
        K,
        np.inf,
        clip_min=-1.0,
        clip_max=1.0,
        y=tf.constant(y),
        decay_factor=1.0,
        sanity_checks=False,
    )
    assert_matches(ours, theirs, clean_net.model)


def test_attacks_differ_from_each_other(clean_net, batch):
    """Guards the cross-checks against a shared mistake: FGSM, PGD and MIM are different points."""
    x, y = batch
    fgsm = np.asarray(attacks.fgsm_attack(clean_net.model, x, y, eps=EPS))
    pgd = np.asarray(attacks.pgd_attack(clean_net.model, x, y, eps=EPS, k=K, eta=ETA))
    mim = np.asarray(attacks.mim_attack(clean_net.model, x, y, eps=EPS, k=K, eta=ETA))
    assert np.mean(np.isclose(fgsm, pgd, atol=1e-6)) < 0.9
    assert np.mean(np.isclose(pgd, mim, atol=1e-6)) < 0.99


def test_logits_model_gives_the_softmax_inputs(clean_net, batch):
    x, _ = batch
    logits = attacks.logits_model(clean_net.model)(x)
    np.testing.assert_allclose(tf.nn.softmax(logits), clean_net.model(x, training=False), atol=1e-6)


def test_logits_model_of_a_dense_softmax_model():
    """DefaultModel's last layer is Dense(softmax): logits are its pre-activation."""
    net = models.DefaultModel(num_classes=3, verbose=False)
    model = net.build_cnn()
    x = np.random.RandomState(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    logits = attacks.logits_model(model)(x)
    np.testing.assert_allclose(tf.nn.softmax(logits), model(x, training=False), atol=1e-6)


def test_attacks_on_the_baseline_sequential_model():
    """DefaultModel's network is a Sequential ending in Dense(softmax); attacks work on it too."""
    model = models.DefaultModel(num_classes=3, verbose=False).build_cnn()
    rng = np.random.RandomState(1)
    x, y = rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32), rng.randint(0, 3, 8)
    ours = attacks.pgd_attack(model, x, y, eps=EPS, k=5, eta=ETA)
    theirs = projected_gradient_descent(
        attacks.logits_model(model),
        tf.constant(x),
        EPS,
        ETA,
        5,
        np.inf,
        clip_min=-1.0,
        clip_max=1.0,
        y=tf.constant(y),
        rand_init=False,
    )
    assert_matches(ours, theirs, model)


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------
def random_images(seed, n, saturated):
    """Uniform images in [-1, 1] with a fraction ``saturated`` of pixels exactly at -1 or 1."""
    rng = np.random.RandomState(seed)
    x = rng.uniform(-1, 1, (n, SIZE, SIZE, 3))
    mask = rng.rand(*x.shape) < saturated
    x[mask] = rng.choice([-1.0, 1.0], size=int(mask.sum()))
    return x.astype(np.float32), rng.randint(0, CLASSES, n)


ATTACKS = {
    "fgsm": lambda model, x, y, eps: attacks.fgsm_attack(model, x, y, eps=eps),
    "pgd": lambda model, x, y, eps: attacks.pgd_attack(model, x, y, eps=eps, k=5, eta=ETA),
    "pgd_random_start": lambda model, x, y, eps: attacks.pgd_attack(
        model, x, y, eps=eps, k=5, eta=ETA, random_start=True
    ),
    "mim": lambda model, x, y, eps: attacks.mim_attack(model, x, y, eps=eps, k=5, eta=ETA),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
@PROPERTY
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 6),
    saturated=st.sampled_from([0.0, 0.3]),
    eps=st.floats(0.0, 0.1),
)
def test_attack_stays_in_eps_ball_and_pixel_range(clean_net, name, seed, n, saturated, eps):
    x, y = random_images(seed, n, saturated)
    adv = np.asarray(ATTACKS[name](clean_net.model, x, y, eps))
    assert adv.shape == x.shape and adv.dtype == np.float32
    assert np.max(np.abs(adv - x)) <= eps + 1e-6
    assert adv.min() >= -1.0 and adv.max() <= 1.0


@pytest.mark.parametrize("name", sorted(ATTACKS))
@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6))
def test_eps_zero_returns_x(clean_net, name, seed, n):
    x, y = random_images(seed, n, 0.3)
    np.testing.assert_array_equal(np.asarray(ATTACKS[name](clean_net.model, x, y, 0.0)), x)


def test_attacks_move_most_pixels_to_the_ball_surface(clean_net, batch):
    """FGSM moves every pixel by exactly eps (unless clipped): the attack is not a no-op."""
    x, y = batch
    adv = np.asarray(attacks.fgsm_attack(clean_net.model, x, y, eps=EPS))
    inside = (x > -1 + EPS) & (x < 1 - EPS)
    np.testing.assert_allclose(np.abs(adv - x)[inside], EPS, atol=1e-6)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(eps=st.floats(0.005, 0.04))
def test_pgd_at_least_as_strong_as_fgsm(clean_net, data, eps):
    """k * eta = 0.04 >= eps: PGD-20 can reach every point FGSM reaches, so it finds at least as many
    adversarial examples, up to a few images where FGSM's single large step happens to win."""
    x, y = data.X_valid, data.y_valid
    pgd = attacks.robust_accuracy(clean_net.model, x, y, attacks.pgd_attack, eps=eps, k=K, eta=ETA)
    fgsm = attacks.robust_accuracy(clean_net.model, x, y, attacks.fgsm_attack, eps=eps)
    assert pgd <= fgsm + 0.02


def test_robust_accuracy_batches_and_clean_accuracy(clean_net, data):
    x, y = data.X_valid, data.y_valid
    assert attacks.robust_accuracy(clean_net.model, x, y, None, batch_size=7) == clean_net.compute_accuracy(
        x, y
    )
    whole = attacks.robust_accuracy(clean_net.model, x, y, attacks.pgd_attack, eps=EPS, k=5, eta=ETA)
    batched = attacks.robust_accuracy(
        clean_net.model, x, y, attacks.pgd_attack, batch_size=32, eps=EPS, k=5, eta=ETA
    )
    assert whole == batched


def test_attacks_do_not_retrace_across_batch_sizes():
    model = net_of(num_blocks=1, feature_maps=4).build_cnn()
    compiled = attacks._compiled(model)
    for n in (5, 7, 3):
        x, y = random_images(n, n, 0.0)
        attacks.fgsm_attack(model, x, y, eps=EPS)
        attacks.pgd_attack(model, x, y, eps=EPS, k=3, eta=ETA)
        attacks.pgd_attack(model, x, y, eps=0.01, k=4, eta=0.001, random_start=True)
        attacks.mim_attack(model, x, y, eps=EPS, k=3, eta=ETA)
    for name in ("fgsm", "pgd", "mim"):
        assert compiled[name].experimental_get_tracing_count() == 1, name
    assert attacks._compiled(model) is compiled


# ------------------------------------------------------------------------------------------------
# Mixup
# ------------------------------------------------------------------------------------------------
def test_mixup_batch_is_the_exact_convex_combination():
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (5, 4, 4, 3)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.randint(0, 3, 5)]
    lam, perm = 0.3, np.array([2, 0, 4, 1, 3])
    x_mixed, y_mixed = training.mixup_batch(tf.constant(x), tf.constant(y), lam, tf.constant(perm))
    np.testing.assert_allclose(
        x_mixed, np.float32(lam) * x + np.float32(1 - lam) * x[perm], rtol=0, atol=1e-7
    )
    np.testing.assert_allclose(
        y_mixed, np.float32(lam) * y + np.float32(1 - lam) * y[perm], rtol=0, atol=1e-7
    )
    np.testing.assert_allclose(np.sum(y_mixed, axis=1), 1.0, atol=1e-6)
    same_x, same_y = training.mixup_batch(tf.constant(x), tf.constant(y), 1.0, tf.constant(perm))
    np.testing.assert_array_equal(same_x, x)
    np.testing.assert_array_equal(same_y, y)


def test_mixup_lambda_is_beta_distributed():
    tf.random.set_seed(0)
    draws = np.array([float(training.sample_beta(0.2)) for _ in range(400)])
    assert np.all((draws >= 0) & (draws <= 1))
    assert stats.kstest(draws, stats.beta(0.2, 0.2).cdf).pvalue > 0.01
    assert stats.kstest(draws, stats.uniform().cdf).pvalue < 0.01


# ------------------------------------------------------------------------------------------------
# SAM
# ------------------------------------------------------------------------------------------------
def softmax_ce_gradients(x, y, w, b):
    """Mean categorical cross-entropy of softmax(x w + b) and its gradients, in float64."""
    z = x @ w + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.mean(np.sum(y * np.log(p), axis=1))
    dz = (p - y) / len(x)
    return loss, x.T @ dz, dz.sum(axis=0)


def tiny_dense(seed=0, sequential=False):
    """Dense(2, softmax) on 3 inputs with known weights, and a batch of 6 examples."""
    rng = np.random.RandomState(seed)
    if sequential:
        net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    else:
        inputs = keras.Input((3,))
        net = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    w, b = rng.normal(0, 0.5, (3, 2)).astype(np.float32), rng.normal(0, 0.1, 2).astype(np.float32)
    net.set_weights([w, b])
    x = rng.normal(0, 1, (6, 3)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[rng.randint(0, 2, 6)]
    return net, x, y, w.astype(np.float64), b.astype(np.float64)


@pytest.mark.parametrize("rho", [0.05, 0.5])
@pytest.mark.parametrize("sequential", [False, True], ids=["functional", "sequential"])
def test_sam_step_equals_hand_computed_update(rho, sequential):
    net, x, y, w, b = tiny_dense(sequential=sequential)
    lr = 0.1
    trainer = training.RegularizedTrainer(net, sam=SAM(rho=rho))
    trainer.compile(
        optimizer=keras.optimizers.SGD(learning_rate=lr), loss=keras.losses.CategoricalCrossentropy()
    )
    history = trainer.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)

    loss, gw, gb = softmax_ce_gradients(x, y, w, b)
    norm = np.sqrt(np.sum(gw**2) + np.sum(gb**2))
    _, sharp_gw, sharp_gb = softmax_ce_gradients(x, y, w + rho * gw / norm, b + rho * gb / norm)
    new_w, new_b = net.get_weights()
    np.testing.assert_allclose(new_w, w - lr * sharp_gw, rtol=0, atol=1e-5)
    np.testing.assert_allclose(new_b, b - lr * sharp_gb, rtol=0, atol=1e-5)
    assert history.history["loss"][0] == pytest.approx(loss, abs=1e-5)  # the loss at w, not at w + e
    # the test can fail: plain SGD lands elsewhere
    assert np.max(np.abs((w - lr * gw) - (w - lr * sharp_gw))) > 1e-4


def test_sam_updates_batch_norm_statistics_once():
    """Batch norm right after the input: its batch mean doesn't depend on the weights, so after one SAM
    step the moving mean is exactly momentum * 0 + (1 - momentum) * batch mean, as after a plain step."""
    rng = np.random.RandomState(1)
    x = rng.normal(2.0, 1.0, (8, 3)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[rng.randint(0, 2, 8)]
    moving_means = []
    for rho in (0.0, 0.05):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((3,))
        bn = keras.layers.BatchNormalization(momentum=0.9)
        net = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(bn(inputs)))
        trainer = training.RegularizedTrainer(net, sam=SAM(rho=rho)) if rho else net
        trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.CategoricalCrossentropy())
        trainer.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        moving_means.append(bn.moving_mean.numpy())
    np.testing.assert_allclose(moving_means[1], 0.1 * x.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(moving_means[1], moving_means[0], rtol=1e-6)


def test_sam_draws_new_dropout_masks_in_both_passes():
    """SAM restores the batch-norm statistics only: the dropout seed state advances once per forward
    pass, so one SAM step (two passes) advances it twice as far as one plain step."""
    rng = np.random.RandomState(2)
    x = rng.normal(0, 1, (8, 3)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[rng.randint(0, 2, 8)]
    advanced = {}
    for rho in (0.0, 0.05):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((3,))
        hidden = keras.layers.BatchNormalization()(keras.layers.Dense(16)(inputs))
        net = keras.Model(
            inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Dropout(0.5)(hidden))
        )
        trainer = training.RegularizedTrainer(net, sam=SAM(rho=rho) if rho else None)
        trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.CategoricalCrossentropy())
        seed = next(v for v in net.non_trainable_variables if "seed_generator" in v.path)
        before = seed.numpy().copy()
        trainer.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        advanced[rho] = (seed.numpy() - before).sum()
    assert [v.path for v in training.batch_norm_statistics(net)] == [
        f"{net.layers[2].name}/moving_mean",
        f"{net.layers[2].name}/moving_variance",
    ]
    assert advanced[0.0] > 0 and advanced[0.05] == 2 * advanced[0.0]


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_sam_fraction_takes_sams_step_on_that_fraction_of_the_steps(fraction):
    """The variant of Question 3.10: over 200 steps the count of SAM steps is Binomial(200, fraction)
    (within 4 standard deviations), every step is either SAM's update or the plain one, and the same
    seed draws the same steps."""
    net, x, y, w, b = tiny_dense(seed=3)
    steps, counts = 200, []
    for _ in range(2):
        net.set_weights([w.astype(np.float32), b.astype(np.float32)])
        trainer = training.RegularizedTrainer(net, sam=SAM(rho=0.5, fraction=fraction), seed=7)
        trainer.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.CategoricalCrossentropy())
        trainer.fit(
            np.tile(x, (steps, 1)), np.tile(y, (steps, 1)), batch_size=len(x), shuffle=False, verbose=0
        )
        counts.append(int(trainer.sam_steps.numpy()))
    sd = np.sqrt(steps * fraction * (1 - fraction))
    assert abs(counts[0] - steps * fraction) <= 4 * sd, counts
    assert counts[0] == counts[1]  # seeded


def test_sam_fraction_steps_are_either_sam_or_plain():
    """With learning rate lr, one step moves w by -lr * (SAM's gradient) or by -lr * (the plain one)."""
    net, x, y, w, b = tiny_dense(seed=4)
    lr, rho = 0.1, 0.5
    _, gw, gb = softmax_ce_gradients(x, y, w, b)
    norm = np.sqrt(np.sum(gw**2) + np.sum(gb**2))
    _, sharp_gw, _ = softmax_ce_gradients(x, y, w + rho * gw / norm, b + rho * gb / norm)
    seen = set()
    for seed in range(12):
        net.set_weights([w.astype(np.float32), b.astype(np.float32)])
        trainer = training.RegularizedTrainer(net, sam=SAM(rho=rho, fraction=0.5), seed=seed)
        trainer.compile(optimizer=keras.optimizers.SGD(lr), loss=keras.losses.CategoricalCrossentropy())
        trainer.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
        new_w = net.get_weights()[0]
        took_sam = bool(trainer.sam_steps.numpy())
        np.testing.assert_allclose(new_w, w - lr * (sharp_gw if took_sam else gw), rtol=0, atol=1e-5)
        seen.add(took_sam)
    assert seen == {True, False}  # twelve seeds draw both kinds of step


# ------------------------------------------------------------------------------------------------
# Adversarial training
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adv_net(data):
    """The clean fixture's model, trained the same 2 epochs with PGD-10 adversarial examples."""
    net = net_of(adversarial=AdversarialTraining(eps=EPS))
    net.build_cnn()
    net.fit(data)
    return net


@pytest.mark.slow
def test_adversarial_training_raises_pgd_accuracy(clean_net, adv_net, data):
    x, y = data.X_valid, data.y_valid
    robust = {}
    for name, net in [("clean", clean_net), ("adv", adv_net)]:
        robust[name] = {
            k: attacks.robust_accuracy(net.model, x, y, attacks.pgd_attack, eps=EPS, k=k, eta=ETA)
            for k in (10, 20)
        }
    print(f"PGD validation accuracy, clean vs adversarial training: {robust}")
    assert robust["adv"][20] >= robust["clean"][20] + 0.05
    assert robust["adv"][10] > robust["clean"][10]


@pytest.mark.slow
def test_adversarial_training_keeps_the_most_robust_epoch(adv_net, data):
    history = adv_net.history
    assert len(history["val_pgd_accuracy"]) == len(history["val_accuracy"]) == 2
    assert adv_net.best_epoch == int(np.argmax(history["val_pgd_accuracy"])) + 1
    kept = attacks.robust_accuracy(
        adv_net.model,
        data.X_valid,
        data.y_valid,
        attacks.pgd_attack,
        eps=EPS,
        k=adv_net.adversarial.validation_steps,
        eta=adv_net.adversarial.step_size,
    )
    assert kept == pytest.approx(max(history["val_pgd_accuracy"]), abs=1e-9)


# ------------------------------------------------------------------------------------------------
# Every option trains the plain network and round-trips through .h5
# ------------------------------------------------------------------------------------------------
OPTIONS = {
    "mixup": dict(mixup=Mixup(alpha=0.2)),
    "adv": dict(adversarial=AdversarialTraining(eps=EPS, steps=3)),
    "sam": dict(sam=SAM(rho=0.05)),
    "sam on half the steps": dict(sam=SAM(rho=0.05, fraction=0.5)),
    "augmentation+early stopping": dict(is_augmentation=True, early_stopping=EarlyStopping(patience=2)),
    "cosine+weight decay": dict(
        schedule=CosineSchedule(warmup_epochs=1), weight_decay=WeightDecay(rate=1e-4)
    ),
    "label smoothing+weight averaging": dict(
        label_smoothing=LabelSmoothing(alpha=0.1), weight_averaging=WeightAveraging(momentum=0.5)
    ),
    "all": dict(
        mixup=Mixup(alpha=0.2),
        adversarial=AdversarialTraining(eps=EPS, steps=2),
        sam=SAM(rho=0.05),
        is_augmentation=True,
        early_stopping=EarlyStopping(patience=1),
        schedule=CosineSchedule(),
        weight_decay=WeightDecay(rate=1e-4),
        drop_rate=0.2,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_option_trains_and_round_trips_through_h5(option, data, tmp_path):
    small = manager_of(data.X_train[:64], data.y_train[:64], data.X_valid[:32], data.y_valid[:32])
    net = net_of(num_blocks=1, feature_maps=4, batch_size=16, num_epochs=2, **OPTIONS[option])
    net.build_cnn()
    initial = [w.copy() for w in net.model.get_weights()]
    history = net.fit(small)
    assert np.all(np.isfinite(history["loss"]))
    if net.adversarial:
        assert len(history["val_pgd_accuracy"]) == len(history["loss"])
    trained = net.model.get_weights()
    changed = [not np.array_equal(a, b) for a, b in zip(initial, trained)]
    assert all(changed), "every weight (kernels, biases, BN statistics) of net.model is trained"
    assert type(net.model) is not training.RegularizedTrainer and net.model.__class__.__name__ == "Functional"
    path = str(tmp_path / f"{option}.h5")
    net.save(path)
    loaded = keras.models.load_model(path, compile=False)
    np.testing.assert_array_equal(
        np.asarray(loaded(small.X_valid, training=False)),
        np.asarray(net.model(small.X_valid, training=False)),
    )


# ------------------------------------------------------------------------------------------------
# The robustness evaluation (evaluate_robustness, eps_curve)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(clean_net, data):
    x, y = data.X_valid[:120], data.y_valid[:120]
    tf.random.set_seed(0)
    accuracy, masks = attacks.evaluate_robustness(
        clean_net.model, x, y, eps=EPS, k=5, eta=ETA, strong_k=8, restarts=3, batch_size=50
    )
    return x, y, accuracy, masks


def test_evaluation_equals_attacking_every_image(clean_net, report):
    """Attacking only the clean-correct images gives the per-image results of attacking all of them
    (and counting a clean mistake as not robust)."""
    x, y, accuracy, masks = report
    model = clean_net.model
    clean = attacks.robust_correct(model, x, y, None)
    np.testing.assert_array_equal(masks["clean"], clean)
    for name, attack, kwargs in [
        ("fgsm", attacks.fgsm_attack, dict(eps=EPS)),
        ("pgd", attacks.pgd_attack, dict(eps=EPS, k=5, eta=ETA)),
        ("mim", attacks.mim_attack, dict(eps=EPS, k=5, eta=ETA)),
        ("pgd_strong", attacks.pgd_attack, dict(eps=EPS, k=8, eta=ETA)),
    ]:
        np.testing.assert_array_equal(
            masks[name], clean & attacks.robust_correct(model, x, y, attack, **kwargs), err_msg=name
        )
    assert 0 < accuracy["pgd"] < accuracy["clean"], "the attacks must change some predictions for this test"


def test_worst_case_is_the_and_of_every_attack_and_at_most_each(report):
    _, _, accuracy, masks = report
    attacks_run = [name for name in masks if name != "worst_case"]
    assert attacks_run == ["clean", "fgsm", "pgd", "mim", "pgd_strong", "pgd_restarts"]
    np.testing.assert_array_equal(masks["worst_case"], np.logical_and.reduce([masks[n] for n in attacks_run]))
    assert all(accuracy["worst_case"] <= accuracy[name] for name in attacks_run)
    assert accuracy == {name: float(mask.mean()) for name, mask in masks.items()}


def test_more_restarts_never_raise_robust_accuracy(clean_net, report):
    x, y, _, _ = report
    previous = 1.0
    for restarts in (1, 2, 4):
        tf.random.set_seed(0)
        accuracy, _ = attacks.evaluate_robustness(
            clean_net.model, x, y, eps=EPS, k=5, eta=ETA, restarts=restarts, batch_size=50
        )
        assert accuracy["pgd_restarts"] <= previous
        previous = accuracy["pgd_restarts"]


def test_restarts_equal_independent_attacks_from_the_clean_image_and_random_starts(clean_net, report):
    """Start r attacks only the survivors of starts 0..r-1, from the clean image first and then from the
    random start that a plain loop over all images would draw, with the step that crosses the ball:
    the survivors are those of that plain loop."""
    x, y, _, masks = report
    step = attacks.restart_step(EPS, ETA, 5)
    assert step == pytest.approx(2.5 * EPS / 5) and 5 * step > 2 * EPS
    tf.random.set_seed(0)
    survived = attacks.robust_correct(clean_net.model, x, y, None)
    for seed in [None, 0, 1, 2]:
        options = dict(random_start=True, seed=seed) if seed is not None else {}
        survived &= attacks.robust_correct(
            clean_net.model, x, y, attacks.pgd_attack, batch_size=50, eps=EPS, k=5, eta=step, **options
        )
    np.testing.assert_array_equal(masks["pgd_restarts"], survived)


def test_restarts_are_never_weaker_than_pgd_from_the_clean_image_with_their_step(clean_net, report):
    x, y, _, masks = report
    clean_start = attacks.robust_correct(
        clean_net.model, x, y, attacks.pgd_attack, eps=EPS, k=5, eta=attacks.restart_step(EPS, ETA, 5)
    )
    assert not np.any(masks["pgd_restarts"] & ~clean_start)


def test_eps_curve_starts_at_the_clean_accuracy_and_falls(clean_net, report):
    x, y, accuracy, _ = report
    rows = attacks.eps_curve(clean_net.model, x, y, [0.0, EPS, 0.1], k=5, eta=ETA)
    assert rows[0] == dict(eps=0.0, fgsm=accuracy["clean"], pgd=accuracy["clean"], mim=accuracy["clean"])
    assert rows[1]["fgsm"] == accuracy["fgsm"]
    assert all(rows[2][name] <= rows[0][name] for name in ("fgsm", "pgd", "mim"))
    assert rows[2]["pgd"] < rows[0]["pgd"]


def test_strong_k_must_exceed_k(clean_net, report):
    x, y, _, _ = report
    with pytest.raises(ValueError, match="strong_k"):
        attacks.evaluate_robustness(clean_net.model, x, y, eps=EPS, k=5, eta=ETA, strong_k=5)


# ------------------------------------------------------------------------------------------------
# #13: the robust checkpoint rule, label smoothing, a start from saved weights, flip TTA, sharpness
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "robust, clean, tolerance, expected",
    [
        ([0.30, 0.38, 0.375, 0.369], [0.70, 0.60, 0.64, 0.66], 0.01, 2),  # 0.369 is out of reach
        ([0.30, 0.38, 0.375, 0.370], [0.70, 0.60, 0.64, 0.66], 0.01, 3),  # 0.370 is within 0.01
        ([0.30, 0.38, 0.375, 0.37], [0.70, 0.60, 0.64, 0.66], 0.0, 1),  # 0: the most robust epoch
        ([0.30, 0.38, 0.38, 0.371], [0.70, 0.62, 0.62, 0.60], 0.01, 1),  # tie on clean: the earlier
        ([0.30, 0.38, 0.375, 0.37], [0.70, 0.60, 0.64, 0.66], 0.1, 0),  # a wide tolerance admits all
    ],
)
def test_choose_robust_epoch(robust, clean, tolerance, expected):
    assert training.choose_robust_epoch(robust, clean, tolerance) == expected


def test_robust_checkpoint_restores_the_chosen_epochs_weights():
    net = tiny_dense()[0]
    checkpoint = training.RobustCheckpoint(tolerance=0.01)
    checkpoint.set_model(net)
    checkpoint.on_train_begin()
    snapshots = []
    for epoch, (robust, clean) in enumerate([(0.30, 0.70), (0.38, 0.60), (0.375, 0.64), (0.36, 0.80)]):
        net.set_weights([w + epoch for w in net.get_weights()])
        snapshots.append(net.get_weights())
        checkpoint.on_epoch_end(epoch, {"val_pgd_accuracy": robust, "val_accuracy": clean})
    checkpoint.on_train_end()
    assert checkpoint.best_epoch == 2
    for kept, expected in zip(net.get_weights(), snapshots[2]):
        np.testing.assert_array_equal(kept, expected)


@pytest.mark.slow
def test_adversarial_fit_reports_the_checkpoint_rules_epoch(data):
    small = manager_of(data.X_train[:96], data.y_train[:96], data.X_valid[:48], data.y_valid[:48])
    adversarial = AdversarialTraining(eps=EPS, steps=2, validation_steps=3, tolerance=0.05)
    net = net_of(num_blocks=1, feature_maps=4, adversarial=adversarial)
    net.build_cnn()
    history = net.fit(small, batch_size=32, num_epochs=3)
    expected = training.choose_robust_epoch(history["val_pgd_accuracy"], history["val_accuracy"], 0.05)
    assert net.best_epoch == expected + 1
    kept = attacks.robust_accuracy(
        net.model, small.X_valid, small.y_valid, attacks.pgd_attack, eps=EPS, k=3, eta=ETA
    )
    assert kept == pytest.approx(history["val_pgd_accuracy"][expected], abs=1e-9)


def test_label_smoothing_softens_the_training_targets_only(data):
    net = net_of(label_smoothing=LabelSmoothing(alpha=0.1))
    dataset = net._train_dataset(data.X_train[:8], data.y_train[:8], batch_size=8)
    _, targets = next(iter(dataset))
    expected = 0.9 * np.eye(CLASSES)[data.y_train[:8]] + 0.1 / CLASSES
    np.testing.assert_allclose(np.sort(np.asarray(targets), axis=0), np.sort(expected, axis=0), atol=1e-7)


class TrainingWeights(keras.callbacks.Callback):
    """Records the raw training weights after every step."""

    def on_train_begin(self, logs=None):
        self.steps = []

    def on_train_batch_end(self, batch, logs=None):
        net = getattr(self.model, "net", self.model)
        self.steps.append([np.array(w) for w in net.trainable_weights])


@pytest.mark.parametrize(
    "options", [{}, {"mixup": Mixup(alpha=0.2)}], ids=["plain", "through RegularizedTrainer"]
)
def test_weight_averaging_validates_and_keeps_the_moving_average(data, options):
    # no batch norm: the network's output then depends on its trainable weights alone
    net = net_of(weight_averaging=WeightAveraging(momentum=0.9), batch_norm=False, **options)
    net.build_cnn()
    recorder = TrainingWeights()
    net.fit(data, callbacks=[recorder])
    assert len(recorder.steps) == 2 * int(np.ceil(len(data.X_train) / 32))
    average = recorder.steps[0]  # Keras starts the average at the first step's weights
    for step in recorder.steps[1:]:
        average = [0.9 * a + 0.1 * w for a, w in zip(average, step)]
    for kept, expected in zip(net.model.trainable_weights, average):
        np.testing.assert_allclose(np.array(kept), expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(np.array(net.model.trainable_weights[0]), recorder.steps[-1][0], atol=1e-6)
    # each epoch's validation measures the averaged weights: the last one is the kept network's accuracy
    assert net.history["val_accuracy"][-1] == pytest.approx(
        net.compute_accuracy(data.X_valid, data.y_valid),
        abs=1e-6,  # float32 metric; one image is 1/150
    )


def test_training_starts_from_initial_weights_and_keys_their_content(clean_net, tmp_path):
    path = tmp_path / "start.h5"
    clean_net.save(str(path))
    net = net_of(initial_weights=InitialWeights(str(path)))
    net.build_cnn()
    for ours, theirs in zip(net.model.get_weights(), clean_net.model.get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    config = net.get_config()["initial_weights"]
    assert list(config) == ["sha256"] and len(config["sha256"]) == 64  # the content, not the path
    moved = tmp_path / "elsewhere.h5"
    moved.write_bytes(path.read_bytes())
    assert net_of(initial_weights=InitialWeights(str(moved))).get_config()["initial_weights"] == config
    other = net_of()
    other.build_cnn()
    other.save(str(moved))
    assert net_of(initial_weights=InitialWeights(str(moved))).get_config()["initial_weights"] != config


def test_flip_tta_averages_the_image_and_its_mirror(clean_net, batch):
    x, _ = batch
    model = clean_net.model
    mirrored = x[:, :, ::-1, :]
    expected = np.argmax(
        np.asarray(model(x, training=False)) + np.asarray(model(mirrored, training=False)), axis=1
    )
    np.testing.assert_array_equal(models.predict_flip_tta(model, x, batch_size=30), expected)


def test_top_hessian_eigenvalue_matches_the_explicit_hessian():
    rng = np.random.RandomState(0)
    x = rng.randn(40, 3, 3, 1).astype(np.float32)
    y = rng.randint(0, 3, 40)
    net = keras.Sequential(
        [
            keras.Input((3, 3, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    net.set_weights([w + 0.3 * rng.randn(*w.shape).astype(np.float32) for w in net.get_weights()])
    variables = net.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = keras.losses.SparseCategoricalCrossentropy()(y, net(x, training=False))
        flat = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], axis=0)
    hessian = np.concatenate(
        [tf.reshape(j, [flat.shape[0], -1]).numpy() for j in outer.jacobian(flat, variables)], axis=1
    )
    eigenvalues = np.linalg.eigvalsh((hessian + hessian.T) / 2)
    top = eigenvalues[np.argmax(np.abs(eigenvalues))]
    value, estimates = training.top_hessian_eigenvalue(net, x, y, iterations=100, batch_size=16)
    assert len(estimates) == 100
    assert value == pytest.approx(top, rel=1e-3)
