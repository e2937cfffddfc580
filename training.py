"""The training regularizers of Questions 3.7, 3.9 and 3.10: mixup, PGD adversarial training and SAM.

Each is described by a small frozen option object (``Mixup``, ``AdversarialTraining``, ``SAM``; the base
``Option`` checks the values once, when the object is made). All three run in one ``keras.Model.train_step``
override (``RegularizedTrainer``, Keras's "customizing what happens in fit()"), around a plain network whose
weights it trains; ``RobustValidation`` adds the validation accuracy under PGD to every epoch's logs (the
checkpoint rule of adversarial training). ``models.YourModel`` takes the option objects and builds these
from them; nothing here knows about ``YourModel``.
"""

import dataclasses
from dataclasses import dataclass
from numbers import Integral

import tensorflow as tf
from tensorflow import keras

from attacks import logits_model, pgd_attack, pgd_loop, robust_accuracy


# --------------------------------------------------------------------------------------------------
# The option objects
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """Base of ``models.YourModel``'s option objects: a frozen dataclass whose ``__post_init__`` checks its
    fields once, with ``require``; the option is off where None is passed instead of the object."""

    def require(self, ok, field, allowed):
        """Unless ``ok``, a one-line ValueError naming the class, the field, its value and what is allowed."""
        if not ok:
            raise ValueError(
                f"{type(self).__name__}({field}={getattr(self, field)!r}): {field} must be {allowed} "
                f"(None instead of a {type(self).__name__} turns it off)."
            )

    def get_config(self):
        """What ``YourModel.get_config`` records of the option: its fields."""
        return dataclasses.asdict(self)


def is_count(value, least):
    """True for an integer (not a bool) of at least ``least``."""
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= least


@dataclass(frozen=True)
class Mixup(Option):
    """Mixup (Zhang et al. 2018): each batch blended with a permutation of itself by lambda ~ Beta(alpha,
    alpha), one draw per batch."""

    alpha: float

    def __post_init__(self):
        self.require(self.alpha > 0, "alpha", "> 0")


@dataclass(frozen=True)
class AdversarialTraining(Option):
    """PGD adversarial training (Madry et al. 2018): every batch replaced by its PGD examples in the L-inf
    ball of radius ``eps``, found in ``steps`` steps of ``step_size`` from a uniform random start. Each
    epoch records the validation accuracy under PGD with ``validation_steps`` steps (``val_pgd_accuracy``),
    and the epoch kept is the best on clean validation among those within ``tolerance`` of the best
    ``val_pgd_accuracy`` (``RobustCheckpoint``; 0: simply the most robust epoch)."""

    eps: float
    steps: int = 10
    step_size: float = 0.002
    validation_steps: int = 20
    tolerance: float = 0.0

    def __post_init__(self):
        self.require(self.eps > 0, "eps", "> 0")
        self.require(is_count(self.steps, 1), "steps", "an integer >= 1")
        self.require(self.step_size > 0, "step_size", "> 0")
        self.require(is_count(self.validation_steps, 1), "validation_steps", "an integer >= 1")
        self.require(self.tolerance >= 0, "tolerance", ">= 0")


@dataclass(frozen=True)
class SAM(Option):
    """Sharpness-Aware Minimization (Foret et al. 2021) with neighbourhood radius ``rho``; ``fraction`` < 1:
    SAM's step on that seeded random fraction of the steps only, a plain step on the others."""

    rho: float
    fraction: float = 1.0

    def __post_init__(self):
        self.require(self.rho > 0, "rho", "> 0")
        self.require(0.0 < self.fraction <= 1.0, "fraction", "in (0, 1]")


# --------------------------------------------------------------------------------------------------
# The training step
# --------------------------------------------------------------------------------------------------


def mixup_batch(x, y, lam, permutation):
    """Mixup of a batch with a permutation of itself (Zhang et al. 2018).

    x: (N, H, W, C) images, y: (N, K) one-hot or soft labels, lam: scalar in [0, 1],
    permutation: (N,) int indices. Returns lam * x + (1 - lam) * x[perm] and the same for y.
    """
    lam = tf.cast(lam, x.dtype)
    x_mixed = lam * x + (1.0 - lam) * tf.gather(x, permutation)
    y_mixed = lam * y + (1.0 - lam) * tf.gather(y, permutation)
    return x_mixed, y_mixed


def sample_beta(alpha):
    """One draw of lambda ~ Beta(alpha, alpha), as the ratio of two Gamma(alpha) draws."""
    a = tf.random.gamma([], alpha)
    b = tf.random.gamma([], alpha)
    return a / (a + b)


def batch_norm_statistics(net):
    """The moving means and variances of every BatchNormalization layer of ``net`` (nested models
    included): the running statistics that a forward pass in training mode updates."""
    found = []
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found += [layer.moving_mean, layer.moving_variance]
        elif hasattr(layer, "layers"):
            found += batch_norm_statistics(layer)
    return found


class RegularizedTrainer(keras.Model):
    """Trains a plain network ``net`` with mixup, PGD adversarial examples and/or SAM.

    A thin ``keras.Model`` around ``net`` whose only change is ``train_step`` ("customizing
    what happens in fit()"): ``call`` is ``net``'s, the weights are ``net``'s, validation is the
    default ``test_step`` on clean data, and ``net`` itself is saved. Per training batch, in
    this order: mixup, then PGD on the (mixed) batch, then one SAM or plain gradient step.
    ``mixup``, ``adversarial``, ``sam``: a ``Mixup``, ``AdversarialTraining``, ``SAM`` or None (off);
    ``seed``: the draws of SAM on a fraction of the steps.
    """

    def __init__(self, net, mixup=None, adversarial=None, sam=None, seed=None):
        super().__init__(name=f"{net.name}_trainer")
        self.net = net
        self.mixup, self.adversarial, self.sam = mixup, adversarial, sam
        self.logits = logits_model(net)
        if self.sam and self.sam.fraction < 1.0:
            # which steps take SAM's ascent: a seeded draw per step; `sam_steps` counts them
            self.sam_draws = keras.random.SeedGenerator(seed)
            self.sam_steps = keras.Variable(0, dtype="int64", trainable=False, name="sam_steps")

    def call(self, x, training=False):
        return self.net(x, training=training)

    def train_step(self, data):
        x, y = data
        if self.mixup:
            lam = sample_beta(self.mixup.alpha)
            x, y = mixup_batch(x, y, lam, tf.random.shuffle(tf.range(tf.shape(x)[0])))
        if self.adversarial:
            eps = self.adversarial.eps
            start = x + tf.random.uniform(tf.shape(x), -eps, eps)
            x = pgd_loop(
                self.logits,
                x,
                y,
                tf.clip_by_value(start, -1.0, 1.0),
                eps,
                self.adversarial.step_size,
                self.adversarial.steps,
            )
        if self.sam and self.sam.fraction < 1.0:
            loss, y_pred, grads = self._sometimes_sam_gradients(x, y)
        elif self.sam:
            loss, y_pred, grads = self._sam_gradients(x, y)
        else:
            loss, y_pred, grads = self._gradients(x, y)
        self.optimizer.apply(grads, self.trainable_variables)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}

    def _gradients(self, x, y):
        """Loss, predictions and gradients of the batch at the current weights."""
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
        return loss, y_pred, tape.gradient(loss, self.trainable_variables)

    def _sam_gradients(self, x, y):
        """SAM (Foret et al. 2021, Algorithm 1): gradient g at w, ascent to w + rho g / ||g||,
        gradient there, back to w. The loss and predictions reported are those at w.

        Batch norm: both passes normalise with the batch's statistics (training mode), but only
        the first pass may update the moving mean and variance; the perturbed pass's update is
        undone, so the running statistics describe the weights w that are kept. Only those are
        restored: the dropout layers' seed states (also non-trainable variables in Keras 3) keep
        advancing, so the two passes, and consecutive steps, draw their own dropout masks.
        """
        loss, y_pred, grads = self._gradients(x, y)
        variables = self.trainable_variables
        norm = tf.linalg.global_norm(grads) + 1e-12
        steps = [self.sam.rho * g / norm for g in grads]
        statistics = batch_norm_statistics(self.net)
        saved = [tf.identity(v) for v in statistics]
        for v, e in zip(variables, steps):
            v.assign_add(e)
        _, _, sharp_grads = self._gradients(x, y)
        for v, e in zip(variables, steps):
            v.assign_sub(e)
        for v, value in zip(statistics, saved):
            v.assign(value)
        return loss, y_pred, sharp_grads

    def _sometimes_sam_gradients(self, x, y):
        """SAM on a random ``fraction`` of the steps, a plain step on the others: SAM's second
        gradient costs about as much as the first, so an epoch costs about ``1 + fraction`` plain
        epochs instead of 2. Each step draws u ~ U[0, 1) from the trainer's seeded generator and takes
        SAM's step when u < fraction (the idea of randomized SAM, e.g. Zhao et al. 2022's SS-SAM)."""
        take_sam = keras.random.uniform((), seed=self.sam_draws) < self.sam.fraction

        def sam():
            self.sam_steps.assign_add(1)
            return self._sam_gradients(x, y)

        return tf.cond(take_sam, sam, lambda: self._gradients(x, y))


class RobustValidation(keras.callbacks.Callback):
    """Adds ``val_pgd_accuracy`` (PGD-k accuracy on the validation set) to each epoch's logs."""

    def __init__(self, X_valid, y_valid, eps, k, eta, batch_size=500):
        super().__init__()
        self.X_valid, self.y_valid = X_valid, y_valid
        self.attack_kwargs = dict(eps=eps, k=k, eta=eta)
        self.batch_size = batch_size

    def on_epoch_end(self, epoch, logs=None):
        net = getattr(self.model, "net", self.model)
        accuracy = robust_accuracy(
            net, self.X_valid, self.y_valid, pgd_attack, batch_size=self.batch_size, **self.attack_kwargs
        )
        if logs is not None:
            logs["val_pgd_accuracy"] = accuracy
        if self.params.get("verbose"):
            print(f" - val_pgd_accuracy: {accuracy:.4f}")


class RobustCheckpoint(keras.callbacks.Callback):
    """The checkpoint rule of adversarial training: keeps every epoch's weights and, when training
    ends, restores those of the epoch with the best ``val_accuracy`` among the epochs whose
    ``val_pgd_accuracy`` is within ``tolerance`` of the best one (ties: the earlier epoch).

    Robust accuracy overfits late in adversarial training (Rice et al. 2020), and epochs within a
    point of each other in PGD accuracy are a tie on 500 validation images (standard error ~0.02), so
    among them the one that is also right on more clean images is kept. ``best_epoch``: 0-based.
    Needs ``RobustValidation`` before it in the callback list.
    """

    def __init__(self, tolerance=0.01):
        super().__init__()
        self.tolerance = tolerance

    def on_train_begin(self, logs=None):
        self.weights, self.robust, self.clean, self.best_epoch = [], [], [], None

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self._net().get_weights())
        self.robust.append(logs["val_pgd_accuracy"])
        self.clean.append(logs["val_accuracy"])

    def on_train_end(self, logs=None):
        if not self.weights:
            return
        self.best_epoch = choose_robust_epoch(self.robust, self.clean, self.tolerance)
        self._net().set_weights(self.weights[self.best_epoch])
        self.weights = []

    def _net(self):
        return getattr(self.model, "net", self.model)


def choose_robust_epoch(robust, clean, tolerance):
    """0-based index of the best ``clean`` value among epochs with ``robust >= max(robust) - tolerance``."""
    floor = max(robust) - tolerance - 1e-12
    eligible = [i for i, r in enumerate(robust) if r >= floor]
    return max(eligible, key=lambda i: (clean[i], -i))


def top_hessian_eigenvalue(net, x, y, iterations=20, batch_size=250, seed=0):
    """The largest eigenvalue of the Hessian of the cross-entropy of ``net`` on (x, y) with respect
    to its trainable weights, by power iteration with Hessian-vector products (Pearlmutter's
    double-backprop trick), and the estimate after each iteration.

    x: (N, H, W, C) images, y: (N,) integer labels; the loss is the mean over the N images with the
    network in inference mode (batch norm uses its moving statistics, no dropout), so the value
    describes the saved network. A flat minimum has a small top eigenvalue, a sharp one a large
    one (Keskar et al. 2017; the sharpness SAM is designed to reduce). Returns (value, estimates).
    """
    variables = net.trainable_variables
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction="sum")

    @tf.function
    def hvp(xb, yb, vector):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_fn(yb, net(xb, training=False))
            grads = inner.gradient(loss, variables)
            dot = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, vector)])
        return outer.gradient(dot, variables)

    def full_hvp(vector):
        total = [tf.zeros_like(v) for v in variables]
        for xb, yb in batches:
            total = [t + h for t, h in zip(total, hvp(xb, yb, vector))]
        return [t / len(x) for t in total]

    rng = tf.random.Generator.from_seed(seed)
    vector = [rng.normal(v.shape) for v in variables]
    estimates = []
    for _ in range(iterations):
        norm = tf.linalg.global_norm(vector)
        vector = [v / norm for v in vector]
        product = full_hvp(vector)
        estimates.append(float(tf.add_n([tf.reduce_sum(p * v) for p, v in zip(product, vector)])))
        vector = product
    return estimates[-1], estimates
