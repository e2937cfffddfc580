"""Adversarial attacks (Question 3.8) and the robustness evaluation of Questions 3.8 to 3.10.

Reads top to bottom: the building blocks (logits, input gradient, projection, the PGD and MIM loops),
the three attacks as one function each (``fgsm_attack``, ``pgd_attack``, ``mim_attack``), then the
evaluation: ``robust_correct`` / ``robust_accuracy`` for one attack, ``evaluate_robustness`` for the
whole report (clean, FGSM, PGD, MIM, PGD with more steps, random restarts, the worst case) and
``eps_curve``; last, AutoAttack's two gradient attacks through the adversarial-robustness-toolbox
(``apgd_attack``: APGD-CE and APGD-T, with the DLR loss ``dlr_loss``; ``robust_correct`` evaluates them).

Conventions: images are float32 arrays (N, H, W, C) with pixels in [-1, 1]; labels are (N,) integer
class indices; a model maps images to (N, K) softmax probabilities. Every attack works in the
L-infinity ball of radius ``eps`` around the clean image and differentiates through the logits; all
but APGD-T are untargeted and maximise the cross-entropy of the true label.
"""

import functools
import warnings
import weakref

import numpy as np
import tensorflow as tf
from tensorflow import keras
from tensorflow.keras import layers

CLIP_MIN, CLIP_MAX = -1.0, 1.0


def logits_model(model):
    """A callable (N, H, W, C) -> (N, K) logits for a model whose last layer applies softmax.

    Attacks differentiate the cross-entropy through the logits, not through the probabilities:
    a confident softmax saturates at 1.0 in float32 and its gradient vanishes, which would make
    an undefended model look robust (gradient masking). Falls back to log-probabilities when the
    last layer is not a softmax (then log_softmax(log p) = log p, the same loss).
    """
    last = model.layers[-1]
    body = keras.Model(model.inputs[0], last.input)  # a Sequential has no .input until called symbolically
    if isinstance(last, layers.Activation) and last.activation is keras.activations.softmax:
        return body
    if isinstance(last, layers.Dense) and last.activation is keras.activations.softmax:
        return lambda x, training=False: tf.matmul(body(x, training=training), last.kernel) + last.bias
    return lambda x, training=False: tf.math.log(tf.maximum(model(x, training=training), 1e-30))


def input_gradient(logits_fn, x, y):
    """Gradient of the summed cross-entropy w.r.t. x; y: (N, K) one-hot or soft labels.
    Batch norm and dropout run in inference mode; the tape watches x only (not the weights)."""
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(x)
        loss = tf.nn.softmax_cross_entropy_with_logits(labels=y, logits=logits_fn(x, training=False))
    return tape.gradient(loss, x)


def project(x_adv, x, eps):
    """Projection onto the L-infinity ball of radius eps around x and onto [CLIP_MIN, CLIP_MAX]."""
    return tf.clip_by_value(tf.clip_by_value(x_adv, x - eps, x + eps), CLIP_MIN, CLIP_MAX)


def pgd_loop(logits_fn, x, y, x_start, eps, eta, k):
    """k steps x <- Proj(x + eta * sign(grad)) from x_start (Madry et al. 2018); y one-hot."""

    def step(i, x_adv):
        return i + 1, project(x_adv + eta * tf.sign(input_gradient(logits_fn, x_adv, y)), x, eps)

    _, x_adv = tf.while_loop(lambda i, _: i < k, step, (tf.constant(0), project(x_start, x, eps)))
    return tf.stop_gradient(x_adv)


def normalized(grad):
    """grad / ||grad||_1 per image (the mean absolute value, as cleverhans's MIM), safe at 0."""
    l1 = tf.reduce_mean(tf.abs(grad), axis=[1, 2, 3], keepdims=True)
    return grad / tf.maximum(l1, 1e-12)


def mim_loop(logits_fn, x, y, x_start, momentum, eps, eta, k, decay):
    """MI-FGSM (Dong et al. 2018): momentum g <- decay * g + grad / ||grad||_1 (per image),
    then x <- Proj(x + eta * sign(g)); k steps from (x_start, momentum), which are (x, 0) for a
    fresh attack; y one-hot."""

    def step(i, x_adv, momentum):
        momentum = decay * momentum + normalized(input_gradient(logits_fn, x_adv, y))
        return i + 1, project(x_adv + eta * tf.sign(momentum), x, eps), momentum

    _, x_adv, _ = tf.while_loop(lambda i, *_: i < k, step, (tf.constant(0), x_start, momentum))
    return tf.stop_gradient(x_adv)


_COMPILED_ATTACKS = weakref.WeakKeyDictionary()


def _compiled(model):
    """The attacks compiled once per model (``tf.function`` with a fixed input signature, so
    batches of any size, eps, eta and k reuse one graph)."""
    if model not in _COMPILED_ATTACKS:
        logits_fn = logits_model(model)
        images = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
        labels = tf.TensorSpec([None], tf.int32)
        scalar, count = tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.int32)
        num_classes = model.output_shape[-1]

        @tf.function(input_signature=[images, labels, scalar])
        def fgsm(x, y, eps):
            grad = input_gradient(logits_fn, x, tf.one_hot(y, num_classes))
            return project(x + eps * tf.sign(grad), x, eps)

        @tf.function(input_signature=[images, labels, images, scalar, scalar, count])
        def pgd(x, y, x_start, eps, eta, k):
            return pgd_loop(logits_fn, x, tf.one_hot(y, num_classes), x_start, eps, eta, k)

        @tf.function(input_signature=[images, labels, images, images, scalar, scalar, count, scalar])
        def mim(x, y, x_start, momentum, eps, eta, k, decay):
            return mim_loop(logits_fn, x, tf.one_hot(y, num_classes), x_start, momentum, eps, eta, k, decay)

        @tf.function(input_signature=[images, labels])
        def gradient(x, y):
            return input_gradient(logits_fn, x, tf.one_hot(y, num_classes))

        @tf.function(input_signature=[images, images, scalar, scalar])
        def first_steps(x, grad, eps, eta):
            """FGSM's image, and the first step of PGD and of MIM (with MIM's momentum after it),
            from the gradient at x; the same operations as in the loops above."""
            momentum = normalized(grad)
            return (
                project(x + eps * tf.sign(grad), x, eps),
                project(x + eta * tf.sign(grad), x, eps),
                project(x + eta * tf.sign(momentum), x, eps),
                momentum,
            )

        _COMPILED_ATTACKS[model] = dict(
            fgsm=fgsm, pgd=pgd, mim=mim, gradient=gradient, first_steps=first_steps
        )
    return _COMPILED_ATTACKS[model]


def _as_tensors(x, y):
    return tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(np.asarray(y), tf.int32)


# --------------------------------------------------------------------------------------------------
# The attacks
# --------------------------------------------------------------------------------------------------
def fgsm_attack(model, x, y, eps=0.0313):
    """FGSM (Goodfellow et al. 2015): x + eps * sign(grad), clipped to [-1, 1].
    x: (N, H, W, C) in [-1, 1]; y: (N,) int labels. Returns a (N, H, W, C) float32 tensor."""
    x, y = _as_tensors(x, y)
    return _compiled(model)["fgsm"](x, y, float(eps))


def pgd_attack(model, x, y, eps=0.0313, k=20, eta=0.002, random_start=False, seed=None, x_start=None):
    """PGD (Madry et al. 2018): k signed-gradient steps of size eta, each projected onto the eps
    ball around x and onto [-1, 1]. The walk starts from x, from a uniform point in the ball
    (``random_start``, seeded by ``seed``) or from ``x_start`` (N, H, W, C), e.g. the result of an
    earlier PGD run: PGD-k from x_start = PGD-j(x) equals PGD-(j + k) from x."""
    x, y = _as_tensors(x, y)
    start = x if x_start is None else tf.convert_to_tensor(x_start, tf.float32)
    if random_start:
        start = x + tf.random.uniform(tf.shape(x), -eps, eps, seed=seed)
    return _compiled(model)["pgd"](x, y, start, float(eps), float(eta), int(k))


def mim_attack(model, x, y, eps=0.0313, k=20, eta=0.002, decay=1.0):
    """MIM (Dong et al. 2018): PGD steps along the sign of the momentum of L1-normalised
    gradients, with decay factor ``decay``."""
    x, y = _as_tensors(x, y)
    return _compiled(model)["mim"](x, y, x, tf.zeros_like(x), float(eps), float(eta), int(k), float(decay))


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
def robust_correct(model, x, y, attack, batch_size=500, **attack_kwargs):
    """(N,) bools: is ``model`` right on ``attack(model, x_batch, y_batch, **attack_kwargs)``?
    Batched; ``attack=None`` checks the clean images."""
    y = np.asarray(y)
    correct = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        if attack is not None:
            xb = attack(model, xb, yb, **attack_kwargs)
        correct.append(np.argmax(model(xb, training=False), axis=1) == yb)
    return np.concatenate(correct)


def robust_accuracy(model, x, y, attack, batch_size=500, **attack_kwargs):
    """Accuracy of ``model`` under ``attack`` (see ``robust_correct``), a float in [0, 1]."""
    return float(np.mean(robust_correct(model, x, y, attack, batch_size, **attack_kwargs)))


def _attacked(model, x, y, keep, settings, k, batch_size):
    """FGSM, PGD-k and MIM-k (decay 1) at each ``(eps, eta)`` of ``settings``, on the images where
    ``keep`` is True (the others count as wrong without any work).

    The gradient at each clean image is computed once and shared: FGSM at every eps is one signed
    step along it, and it is also the first step of PGD and of MIM (whose momentum starts as that
    gradient, normalised), which then continue for k - 1 steps. The results are those of
    ``fgsm_attack``, ``pgd_attack`` and ``mim_attack``, image for image.

    Returns ``{(eps, eta): {"fgsm": mask, "pgd": mask, "mim": mask}}`` with (N,) bool masks, and
    ``{(eps, eta): PGD's adversarial images of the kept images, in order}``.
    """
    fns = _compiled(model)
    masks = {
        setting: {name: np.zeros(len(x), dtype=bool) for name in ("fgsm", "pgd", "mim")}
        for setting in settings
    }
    pgd_images = {setting: [] for setting in settings}
    chosen = np.flatnonzero(keep)
    for start in range(0, len(chosen), batch_size):
        idx = chosen[start : start + batch_size]
        xb, yb = _as_tensors(x[idx], y[idx])
        grad = fns["gradient"](xb, yb)
        for eps, eta in settings:
            eps_t, eta_t = tf.constant(eps, tf.float32), tf.constant(eta, tf.float32)
            x_fgsm, x_pgd, x_mim, momentum = fns["first_steps"](xb, grad, eps_t, eta_t)
            x_pgd = fns["pgd"](xb, yb, x_pgd, eps_t, eta_t, k - 1)
            x_mim = fns["mim"](xb, yb, x_mim, momentum, eps_t, eta_t, k - 1, 1.0)
            for name, x_adv in (("fgsm", x_fgsm), ("pgd", x_pgd), ("mim", x_mim)):
                masks[(eps, eta)][name][idx] = np.argmax(model(x_adv, training=False), axis=1) == y[idx]
            pgd_images[(eps, eta)].append(x_pgd.numpy())
    return masks, pgd_images


def restart_step(eps, eta, k):
    """The PGD step of the restarts and of the eps curve: ``max(eta, 2.5 * eps / k)``, so that k steps
    can move a pixel 2.5 eps, from any start across the ball (width 2 eps) with room to spare."""
    return max(eta, 2.5 * eps / k)


def evaluate_robustness(model, x, y, eps, k, eta, strong_k=None, restarts=0, batch_size=500):
    """Per-image robustness of ``model`` on (x, y) under every attack of Questions 3.8 and 3.9.

    An image counts as robust under an attack when the model is right on the clean image AND on the
    attacked one (the clean image is itself a point of the eps ball, so a clean mistake is never
    robust). Only images that can still count are attacked, which is what makes this fast:

    - ``clean``: one forward pass, shared by everything below;
    - ``fgsm``, ``pgd`` (PGD-k), ``mim`` (MIM-k, decay 1): on the clean-correct images, sharing the
      gradient at the clean image (see ``_attacked``);
    - ``pgd_strong`` (PGD-``strong_k``, if given, > k): continues PGD-k's walk for strong_k - k more
      steps (PGD is a Markov chain from x, so this is PGD-strong_k from x);
    - ``pgd_restarts`` (if ``restarts`` > 0): PGD-k with the step ``restart_step(eps, eta, k)``, large
      enough for k steps to cross the ball, from the clean image and then from ``restarts`` uniform
      random points of the ball (seeds 0, 1, ...); robust only if every start fails, so start r only
      runs on the images that survived starts 0..r-1. The random starts are drawn for every image
      of each batch of ``batch_size`` images, as a plain loop over the batches would draw them;
    - ``worst_case``: robust under every attack above (the AND of their masks; no extra work).

    Returns ``(accuracy, masks)``: dicts name -> float in [0, 1] and name -> (N,) bool array.
    """
    y = np.asarray(y)
    masks = {"clean": robust_correct(model, x, y, None, batch_size)}
    attacked, pgd_images = _attacked(model, x, y, masks["clean"], [(eps, eta)], k, batch_size)
    masks.update(attacked[(eps, eta)])
    if strong_k:
        if strong_k <= k:
            raise ValueError(f"strong_k={strong_k!r} must be larger than k={k!r}.")
        strong = np.zeros(len(x), dtype=bool)
        chosen = np.flatnonzero(masks["clean"])
        for batch, start in enumerate(range(0, len(chosen), batch_size)):
            idx = chosen[start : start + batch_size]
            x_start = pgd_images[(eps, eta)][batch]
            x_adv = pgd_attack(model, x[idx], y[idx], eps=eps, k=strong_k - k, eta=eta, x_start=x_start)
            strong[idx] = np.argmax(model(x_adv, training=False), axis=1) == y[idx]
        masks["pgd_strong"] = strong
    if restarts:
        step, survived = restart_step(eps, eta, k), masks["clean"].copy()
        for seed in [None, *range(restarts)]:  # None: the clean image
            for start in range(0, len(x), batch_size):
                xb = tf.convert_to_tensor(x[start : start + batch_size], tf.float32)
                if seed is not None:
                    xb = xb + tf.random.uniform(tf.shape(xb), -eps, eps, seed=seed)
                local = np.flatnonzero(survived[start : start + batch_size])
                if len(local) == 0:
                    continue
                idx = start + local
                x_adv = pgd_attack(
                    model, x[idx], y[idx], eps=eps, k=k, eta=step, x_start=tf.gather(xb, local)
                )
                survived[idx] = np.argmax(model(x_adv, training=False), axis=1) == y[idx]
        masks["pgd_restarts"] = survived
    masks["worst_case"] = np.logical_and.reduce(list(masks.values()))
    return {name: float(mask.mean()) for name, mask in masks.items()}, masks


def eps_curve(model, x, y, eps_values, k, eta, batch_size=500, clean=None):
    """Accuracy under FGSM, PGD-k and MIM-k for each eps in ``eps_values``, as a list of dicts
    ``{eps, fgsm, pgd, mim}``. The step is ``restart_step(eps, eta, k)``, so that k steps can reach
    the border of a larger ball. Robust means right on the clean and the attacked image, as in
    ``evaluate_robustness``; at eps = 0 every attack returns x, so the accuracy is the clean one.
    ``clean``: the (N,) clean-correct mask, if already computed."""
    y = np.asarray(y)
    if clean is None:
        clean = robust_correct(model, x, y, None, batch_size)
    settings = [(eps, restart_step(eps, eta, k)) for eps in eps_values if eps > 0]
    attacked, _ = _attacked(model, x, y, clean, settings, k, batch_size)
    rows = []
    for eps in eps_values:
        masks = (
            attacked[(eps, restart_step(eps, eta, k))] if eps > 0 else dict(fgsm=clean, pgd=clean, mim=clean)
        )
        rows.append(dict(eps=eps, **{name: float(mask.mean()) for name, mask in masks.items()}))
    return rows


# --------------------------------------------------------------------------------------------------
# APGD: the two gradient attacks of AutoAttack (Croce & Hein, ICML 2020), through ART
# --------------------------------------------------------------------------------------------------
# Auto-PGD needs no step size: it starts at 2 eps, takes momentum steps, and halves the step at
# checkpoints (22%, 41%, ... of the iterations) where the loss stopped rising, restarting from the best
# point. AutoAttack's standard version runs APGD-CE (untargeted cross-entropy) and APGD-T (the targeted
# DLR loss, once per each of the 9 classes ranked highest after the true one), 100 iterations and one
# random start each. Here ART 1.20.1's ``AutoProjectedGradientDescent`` walks; this module supplies the
# loss, the labels and the bookkeeping where ART departs from AutoAttack in a way that matters here
# (paths under site-packages/art/):
#
# 1. attacks/evasion/auto_projected_gradient_descent.py:156-198, with targeted=True: the targeted
#    "difference_logits_ratio" is the untargeted DLR of the target class, minimised (the gradient's sign
#    is flipped at line 471): -(z_t - max_{i!=t} z_i) / (z_pi1 - z_pi3). That is not Croce & Hein's
#    targeted DLR, -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), and it is identically 1 whenever the
#    target is the third-ranked class: its gradient is rounding noise (~1e-8), whose sign APGD follows.
#    Fix: ``dlr_loss``, passed as the estimator's loss (loss_type=None).
# 2. Same file, lines 408 and 584, with targeted=True: an image counts as broken only if it is classified
#    as the target; otherwise ART returns the random start. AutoAttack's APGD-T counts any wrong class.
#    Fix: run ART in its untargeted mode (it maximises the loss and calls an image broken when argmax
#    differs from argmax of the label) with the label row one_hot(y) - one_hot(t): argmax is y, and
#    ``dlr_loss`` reads the target t from the -1. (This also keeps clear of line 511, which takes the
#    first step as the best point when the loss rises, even in the targeted mode, where it should fall.)
# 3. Same file, lines 582-588: ART returns the last iterate, and only if the model is wrong there;
#    AutoAttack counts an image as broken if the model is wrong at any iterate. Fix: the estimator below
#    watches every point ART evaluates (every iterate passes through ``compute_loss``) and keeps, per
#    image, the first one the model gets wrong.
# Left as ART does it: (a) condition 1 of the step-size rule counts iterations that beat the best loss
# so far (lines 543-547), where the paper counts iterations whose loss exceeds the previous iterate's,
# so ART halves the step at least as often; (b) the random start is uniform in the eps cube
# (art/utils.py:609, random_sphere), AutoAttack's is scaled to touch the cube's surface;
# nb_random_init=0 (a start at x, documented at line 88) is rejected at line 610, so every run starts
# at random. One start per run (nb_random_init=1), as AutoAttack's standard version.


def dlr_loss(labels, logits):
    """Croce & Hein's difference-of-logits-ratio loss per image, the quantity APGD maximises.

    labels: (N, K), each row either one_hot(y) (untargeted) or one_hot(y) - one_hot(t) (targeted at
    class t, marked by the -1); logits: (N, K), K >= 4. With z_pi1 >= z_pi2 >= ... the sorted logits:

    - untargeted: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)
    - targeted:   -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)

    plus 1e-12 in the denominator, as AutoAttack. The ratio is invariant to shifting and scaling the
    logits, so a model cannot hide behind their scale. Returns (N,) float32.
    """
    logits = tf.convert_to_tensor(logits, tf.float32)
    labels = tf.convert_to_tensor(labels, tf.float32)
    is_true, is_target = labels > 0, labels < 0
    z_y = tf.reduce_sum(tf.where(is_true, logits, 0.0), axis=1)
    z_t = tf.reduce_sum(tf.where(is_target, logits, 0.0), axis=1)
    z_other = tf.reduce_max(tf.where(is_true, -np.inf, logits), axis=1)
    top = tf.math.top_k(logits, k=4).values
    targeted = tf.reduce_any(is_target, axis=1)
    margin = tf.where(targeted, z_y - z_t, z_y - z_other)
    scale = tf.where(targeted, top[:, 0] - (top[:, 2] + top[:, 3]) / 2, top[:, 0] - top[:, 2])
    return -margin / (scale + 1e-12)


@functools.cache
def _art():
    """ART's APGD and a ``TensorFlowV2Classifier`` that watches APGD's walk (issue 3 above).

    Imported on first use: ART writes ~/.art/config.json when imported and warns that PyTorch is
    absent, which nothing else in this module needs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PyTorch not found", category=UserWarning)
        from art.attacks.evasion import AutoProjectedGradientDescent
        from art.estimators.classification import TensorFlowV2Classifier

    class WatchedClassifier(TensorFlowV2Classifier):
        """ART's estimator, plus a record of one ``generate(x, labels)`` call (announced by ``watch``): for
        each image, has the model been wrong at any point APGD evaluated (``fooled``), and the first such
        point (``first_wrong``). ART evaluates every iterate through ``compute_loss``, and its first
        ``predict`` in ``generate`` (line 406) decides which images it attacks: those it gets right.
        ``loss_gradient`` is ART's, compiled (ART's runs eagerly: 1.7 s instead of about 1 s per step on
        500 images of the 3-block CNN, on 2 cores)."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            images = tf.TensorSpec([None, *self.input_shape], tf.float32)
            labels = tf.TensorSpec([None, self.nb_classes], tf.float32)
            self._gradient = tf.function(self._eager_gradient, input_signature=[images, labels])
            self.watch(None)

        def _eager_gradient(self, x, y):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = self._loss_object(y, self._model(x, training=False))
            return tape.gradient(loss, x)  # of the sum of the per-image losses

        def loss_gradient(self, x, y, training_mode=False, **kwargs):
            return self._gradient(
                tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y, tf.float32)
            ).numpy()

        def watch(self, labels):
            """Record the next ``generate(x, labels)``; None stops recording."""
            self.labels, self.attacked = labels, None

        def predict(self, x, batch_size=128, training_mode=False, **kwargs):
            predictions = super().predict(x, batch_size=batch_size, training_mode=training_mode, **kwargs)
            if self.labels is not None and self.attacked is None:  # generate's first look at x
                right = np.argmax(predictions, axis=1) == np.argmax(self.labels, axis=1)
                self.attacked, self.fooled = np.flatnonzero(right), ~right
                self.first_wrong = np.array(x, dtype=np.float32)  # x itself for the images it gets wrong
            return predictions

        def compute_loss(self, x, y, reduction="none", training_mode=False, **kwargs):
            logits = self._forward_pass(self._model, tf.convert_to_tensor(x), training=False)
            if self.attacked is not None:
                if len(x) != len(self.attacked):  # APGD's batch_size must cover every attacked image
                    raise RuntimeError(f"APGD evaluated {len(x)} images; it attacks {len(self.attacked)}")
                wrong = np.argmax(logits, axis=1) != np.argmax(y, axis=1)
                new = wrong & ~self.fooled[self.attacked]
                self.first_wrong[self.attacked[new]] = x[new]
                self.fooled[self.attacked[wrong]] = True
            losses = np.asarray(self._loss_object(y, logits))
            return dict(none=losses, mean=losses.mean(), sum=losses.sum())[reduction]

    return AutoProjectedGradientDescent, WatchedClassifier


APGD_LOSSES = ("ce", "dlr")


def apgd_classifier(model, loss):
    """ART's estimator of ``model``'s logits (``logits_model``: the DLR ratio is defined on logits, and
    cross-entropy through the logits does not saturate) with the loss APGD maximises: ``"ce"``, the
    softmax cross-entropy of the labels, or ``"dlr"``, ``dlr_loss``. Pixels are clipped to [-1, 1]."""
    if loss not in APGD_LOSSES:
        raise ValueError(f"loss={loss!r}: expected one of {APGD_LOSSES}")
    loss_object = (
        keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None) if loss == "ce" else dlr_loss
    )
    return _art()[1](
        model=logits_model(model),
        nb_classes=model.output_shape[-1],
        input_shape=tuple(model.input_shape[1:]),
        loss_object=loss_object,
        clip_values=(CLIP_MIN, CLIP_MAX),
    )


def _check_apgd_inputs(model, x, y, eps, iterations, loss, targeted, targets):
    """x as float32 and y as int, or a ValueError that names the bad value."""
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y)
    num_classes = model.output_shape[-1]
    if not eps > 0:
        raise ValueError(f"eps={eps!r}: the radius of the L-inf ball must be positive")
    if not (isinstance(iterations, int | np.integer) and iterations >= 1):
        raise ValueError(f"iterations={iterations!r}: expected an integer >= 1")
    if loss not in APGD_LOSSES:
        raise ValueError(f"loss={loss!r}: expected one of {APGD_LOSSES}")
    if targeted and loss != "dlr":
        raise ValueError(f"targeted APGD uses the targeted DLR loss: got loss={loss!r}, expected 'dlr'")
    if loss == "dlr" and num_classes < 4:
        raise ValueError(f"the DLR loss needs at least 4 classes; the model has {num_classes}")
    if targeted and not 1 <= targets < num_classes:
        raise ValueError(f"targets={targets!r}: expected 1 to {num_classes - 1} (classes other than y)")
    if x.shape[1:] != tuple(model.input_shape[1:]):
        raise ValueError(f"x has shape {x.shape}; the model takes images of shape {model.input_shape[1:]}")
    if y.shape != (len(x),):
        raise ValueError(f"y has shape {y.shape}; expected ({len(x)},), one integer label per image")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}): got {y.min()} to {y.max()}")
    if x.size and (x.min() < CLIP_MIN or x.max() > CLIP_MAX):
        raise ValueError(f"pixels must lie in [{CLIP_MIN}, {CLIP_MAX}]: got {x.min()} to {x.max()}")
    return x, y.astype(np.int64)


def _apgd_run(classifier, x, labels, eps, iterations, seed):
    """One APGD run of ``iterations`` steps from one random start.

    x: (n, H, W, C); labels: (n, K) rows as ``dlr_loss`` reads them. Returns (fooled, points): (n,) bools,
    and for each image the first point at which the model is wrong if any (x itself if it is wrong
    there), else ART's last point (in the ball)."""
    attack = _art()[0](
        classifier,
        norm=np.inf,
        eps=eps,
        eps_step=2 * eps,  # Croce & Hein's initial step
        max_iter=iterations,
        targeted=False,  # issue 2: the targeted loss is maximised, any wrong class counts
        nb_random_init=1,
        batch_size=len(x),  # one ART batch: compute_loss sees every attacked image at once
        loss_type=None,  # the classifier's loss: issue 1
        verbose=False,
    )
    state = np.random.get_state()  # ART draws its random start from NumPy's global generator
    np.random.seed(seed)
    classifier.watch(labels)
    try:
        last = attack.generate(x, labels)
        fooled, first_wrong = classifier.fooled, classifier.first_wrong
    finally:
        classifier.watch(None)
        np.random.set_state(state)
    return fooled, np.where(fooled.reshape(-1, *[1] * (x.ndim - 1)), first_wrong, last)


def apgd_attack(
    model, x, y, eps=0.0313, iterations=100, loss="ce", targeted=False, targets=9, seed=0, batch_size=500
):
    """APGD (Croce & Hein 2020) in the L-inf ball of radius eps around each image, through ART.

    x: (N, H, W, C) float32 in [-1, 1]; y: (N,) int labels. ``loss="ce"``: APGD-CE (untargeted
    cross-entropy); ``loss="dlr"``: untargeted DLR, or with ``targeted=True`` APGD-T: one run with the
    targeted DLR loss for each of the ``targets`` classes ranked highest by the clean logits after the
    true one (AutoAttack: 9), each run only on the images that the earlier runs did not break. Each run
    takes ``iterations`` steps from one uniform random start (seeded by ``seed``; NumPy's global
    generator is restored afterwards), in batches of ``batch_size`` images.

    Returns a (N, H, W, C) float32 array of points of the ball in [-1, 1]: for each image the first
    point found at which the model is wrong (at any iterate of any run, as AutoAttack counts), else
    the last point of the last run (x itself for an image the model already gets wrong).
    """
    x, y = _check_apgd_inputs(model, x, y, eps, iterations, loss, targeted, targets)
    classifier = apgd_classifier(model, loss)
    num_classes = model.output_shape[-1]
    x_adv = x.copy()
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = classifier.predict(xb)  # an image the model already gets wrong needs no attack
        alive = np.argmax(logits, axis=1) == yb
        ranked = np.argsort(-logits, axis=1, kind="stable")  # for an image classified right, ranked[:, 0] = y
        for rank in range(1, targets + 1) if targeted else [None]:
            idx = np.flatnonzero(alive)
            if len(idx) == 0:
                break
            labels = np.eye(num_classes, dtype=np.float32)[yb[idx]]
            if rank is not None:
                labels[np.arange(len(idx)), ranked[idx, rank]] = -1.0
            fooled, points = _apgd_run(classifier, xb[idx], labels, eps, iterations, seed)
            x_adv[start + idx] = points
            alive[idx[fooled]] = False
    return x_adv
