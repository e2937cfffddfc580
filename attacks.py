"""Adversarial attacks (Question 3.8) and the robustness evaluation of Questions 3.8 to 3.10.

Reads top to bottom: the building blocks (logits, input gradient, projection, the PGD and MIM loops),
the three attacks as one function each (``fgsm_attack``, ``pgd_attack``, ``mim_attack``), then the
evaluation: ``robust_correct`` / ``robust_accuracy`` for one attack, ``evaluate_robustness`` for the
whole report (clean, FGSM, PGD, MIM, PGD with more steps, random restarts, the worst case) and
``eps_curve``.

Conventions: images are float32 arrays (N, H, W, C) with pixels in [-1, 1]; labels are (N,) integer
class indices; a model maps images to (N, K) softmax probabilities. Every attack is untargeted, in the
L-infinity ball of radius ``eps`` around the clean image, and maximises the cross-entropy of the true
label, differentiated through the logits.
"""

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
