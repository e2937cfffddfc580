"""The course's module for Part 3 of FIT3181 Assignment 1 (2022): the Animals data and the CNNs.

Reads top to bottom:

1. Data: ``SimplePreprocessor``, ``create_label_folder_dict``, ``AnimalsDatasetManager``.
2. The course baseline: ``DefaultModel`` (build, fit, evaluate, plot, save/load).
3. ``YourModel``: blocks with batch norm, skip connection and dropout, augmentation, and its training
   options: early stopping, the learning-rate schedule, weight decay and averaging, label smoothing,
   initial weights, and the training regularizers of Questions 3.7, 3.9 and 3.10 (mixup, PGD
   adversarial training, SAM), which live in ``training.py``.

The attacks of Question 3.8 are in ``attacks.py``, the experiment cache in ``experiments.py``.
Imports run one way: ``attacks`` <- ``training`` <- ``models`` <- ``experiments``.

Options. ``YourModel`` takes the course's 17 arguments as the assignment gives them, then keyword options,
each a small frozen object or None. None is off, and it is every option's default: no option is switched on,
or given a value, by another argument (so Question 3.5's early stopping is written where its runs are made,
``early_stopping=EarlyStopping(patience=3, start_from_epoch=30)``). A call reads as its recipe::

    YourModel(..., is_augmentation=True, schedule=CosineSchedule(warmup_epochs=2),
              early_stopping=EarlyStopping(patience=3, start_from_epoch=30), sam=SAM(rho=0.05))

How to add an option: one object, one place. Write a frozen dataclass on ``training.Option`` whose
``__post_init__`` checks each field with ``require`` (a one-line ValueError naming the value and what is
allowed): here, or in ``training.py`` when the training step reads it. Add its keyword, with default None, to
``YourModel.__init__`` and to ``YourModel.OPTIONS``, and read it where it acts (``_make_optimizer``,
``_trainer``, ``_train_dataset``, ``_callbacks`` or ``build_cnn``): ``YourModel`` refuses anything else for
that keyword, ``get_config`` records the object's fields under its keyword (the experiment cache's key) and
``experiments.network_of`` makes it again from that record. Where Keras has the object, the option describes
it and builds it for each fit (``EarlyStopping``, ``CosineSchedule``): Keras's own are stateful and need the
run's length, so they cannot be made once, in the constructor.

Conventions: images are float32 arrays of shape (N, H, W, C) with pixels in [-1, 1], RGB;
labels are integer class indices of shape (N,); every network maps images to class
probabilities (softmax output).
"""

import os
import warnings
from dataclasses import dataclass

import cv2
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from tensorflow import keras
from tensorflow.keras import layers

from report import plot_histories
from storage import file_sha256, save_model
from training import (
    SAM,
    AdversarialTraining,
    Mixup,
    Option,
    RegularizedTrainer,
    RobustCheckpoint,
    RobustValidation,
    is_count,
)

SEED = 1234
"""The default seed of weight initialisation, shuffling, augmentation and mixup."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------------------------------
# 1. Data
# --------------------------------------------------------------------------------------------------
class SimplePreprocessor:
    """Resizes an image to (height, width) and converts OpenCV's BGR channel order to RGB."""

    def __init__(self, width, height, inter=cv2.INTER_AREA):
        self.width = width
        self.height = height
        self.inter = inter

    def preprocess(self, image):
        """(H0, W0, 3) uint8 BGR -> (height, width, 3) uint8 RGB."""
        resized = cv2.resize(image, (self.width, self.height), interpolation=self.inter)
        return cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)


def create_label_folder_dict(adir):
    """``{class_name: absolute_folder}`` for every sub-folder of ``adir``, in sorted order."""
    if not os.path.isdir(adir):
        raise FileNotFoundError(
            f"Dataset folder not found: {os.path.abspath(adir)!r}. Put the Animals images there "
            "(one sub-folder per class) or set the environment variable ANIMALS_DIR."
        )
    sub_folders = sorted(f for f in os.listdir(adir) if os.path.isdir(os.path.join(adir, f)))
    if not sub_folders:
        raise FileNotFoundError(f"Dataset folder {os.path.abspath(adir)!r} has no class sub-folders.")
    return {folder: os.path.abspath(os.path.join(adir, folder)) for folder in sub_folders}


class AnimalsDatasetManager:
    """Loads the Animals images, scales them to [-1, 1] and splits them into train/valid/test."""

    def __init__(self, preprocessors=None, random_state=6789):
        self.preprocessors = list(preprocessors or [])
        self.random_state = np.random.RandomState(random_state)
        self.data, self.labels, self.classes = None, None, None

    def load(self, label_folder_dict, max_num_images=500, verbose=-1):
        """Reads the first ``max_num_images`` readable images of each class (files sorted by name).

        Prints ``"<class> <number of files>"`` per class and ``"Processed i/max"`` every ``verbose``
        images. Unreadable files are skipped with one warning that counts them. Raises
        ``FileNotFoundError`` for a missing class folder or one without images.
        """
        images, labels, skipped = [], [], []
        for label in sorted(label_folder_dict):
            folder = label_folder_dict[label]
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"Class folder not found: {folder!r} (class {label!r}).")
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise FileNotFoundError(f"Class folder {folder!r} (class {label!r}) has no images.")
            print(label, len(files))
            count = 0
            for file in files:
                if count >= max_num_images:
                    break
                image = cv2.imread(os.path.join(folder, file))
                if image is None:
                    skipped.append(os.path.join(folder, file))
                    continue
                for preprocessor in self.preprocessors:
                    image = preprocessor.preprocess(image)
                images.append(image)
                labels.append(label)
                count += 1
                if verbose > 0 and count % verbose == 0:
                    print(f"Processed {count}/{max_num_images}")
        if skipped:
            warnings.warn(
                f"Skipped {len(skipped)} unreadable image file(s), e.g. {skipped[0]!r}.", stacklevel=2
            )
        self.data = np.array(images)
        self.labels = np.array(labels)
        return self.data, self.labels

    def process_data_label(self):
        """Encodes labels as integers (classes sorted) and scales pixels to float32 in [-1, 1]."""
        encoder = LabelEncoder()
        self.labels = encoder.fit_transform(self.labels)
        self.classes = encoder.classes_
        self.data = self.data.astype(np.float32) / 127.5 - 1.0

    def train_valid_test_split(self, train_size=0.8, test_size=0.1, rand_seed=33):
        """Seeded split, the course's arithmetic: test first, then valid out of the rest."""
        valid_size = 1 - (train_size + test_size)
        X_rest, self.X_test, y_rest, self.y_test = train_test_split(
            self.data, self.labels, test_size=test_size, random_state=rand_seed
        )
        self.X_train, self.X_valid, self.y_train, self.y_valid = train_test_split(
            X_rest, y_rest, test_size=valid_size / (valid_size + train_size), random_state=rand_seed
        )

    def next_batch(self, batch_size=32):
        """A random training batch: (batch_size, H, W, C) images and (batch_size,) labels."""
        idx = self.random_state.choice(len(self.X_train), batch_size, replace=False)
        return self.X_train[idx], self.y_train[idx]


# --------------------------------------------------------------------------------------------------
# 2. The course baseline
# --------------------------------------------------------------------------------------------------
OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "nadam": keras.optimizers.Nadam,
    "adagrad": keras.optimizers.Adagrad,
    "rmsprop": keras.optimizers.RMSprop,
    "adadelta": keras.optimizers.Adadelta,
    "sgd": keras.optimizers.SGD,
}


def to_display(images):
    """Images in [-1, 1] -> [0, 1] for ``plt.imshow``."""
    return np.clip((np.asarray(images) + 1.0) / 2.0, 0.0, 1.0)


class DefaultModel:
    """The course's baseline CNN and the training/evaluation methods every model shares.

    ``self.model`` is a plain Keras model mapping (N, height, width, depth) images in [-1, 1] to
    (N, num_classes) softmax probabilities; it saves to ``.h5`` and loads with
    ``keras.models.load_model(path, compile=False)``.
    """

    def __init__(
        self,
        name="network1",
        width=32,
        height=32,
        depth=3,
        num_blocks=2,
        feature_maps=32,
        num_classes=4,
        drop_rate=0.2,
        batch_norm=None,
        is_augmentation=False,
        activation_func="relu",
        use_skip=True,
        optimizer="adam",
        batch_size=10,
        num_epochs=20,
        learning_rate=0.0001,
        verbose=True,
        *,
        seed=SEED,
    ):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {optimizer!r}; allowed: {sorted(OPTIMIZERS)}.")
        try:
            keras.activations.get(activation_func)
        except ValueError:
            raise ValueError(
                f"Unknown activation {activation_func!r}; use a Keras activation name "
                "such as 'relu', 'elu', 'tanh', 'sigmoid'."
            ) from None
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate={drop_rate!r} must be in [0, 1).")
        if not isinstance(num_blocks, int) or num_blocks < 1 or 2**num_blocks > min(width, height):
            raise ValueError(
                f"num_blocks={num_blocks!r} must be an integer in "
                f"[1, {int(np.log2(min(width, height)))}] for {width}x{height} images "
                "(each block halves the image)."
            )
        self.name = name
        self.width, self.height, self.depth = width, height, depth
        self.num_blocks = num_blocks
        self.feature_maps = feature_maps
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.batch_norm = batch_norm
        self.is_augmentation = is_augmentation
        self.activation_func = activation_func
        self.use_skip = use_skip
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.num_epochs = num_epochs
        self.learning_rate = learning_rate
        self.verbose = verbose
        self.seed = seed
        self.model = None
        self.history = None
        self.best_epoch = None

    def build_cnn(self):
        """conv32-conv32-avgpool-conv64-conv64-avgpool-flatten-dense softmax (106,538 parameters
        for 32x32x3 inputs and 10 classes)."""
        keras.utils.set_random_seed(self.seed)
        conv = dict(kernel_size=(3, 3), strides=(1, 1), padding="same", activation=self.activation_func)
        self.model = keras.Sequential(
            [
                keras.Input(shape=(self.height, self.width, self.depth)),
                layers.Conv2D(32, **conv),
                layers.Conv2D(32, **conv),
                layers.AveragePooling2D(pool_size=(2, 2), padding="same"),
                layers.Conv2D(64, **conv),
                layers.Conv2D(64, **conv),
                layers.AveragePooling2D(pool_size=(2, 2), padding="same"),
                layers.Flatten(),
                layers.Dense(self.num_classes, activation="softmax"),
            ],
            name=self.name,
        )
        return self.model

    CONFIG_KEYS = (
        "width",
        "height",
        "depth",
        "num_blocks",
        "feature_maps",
        "num_classes",
        "drop_rate",
        "batch_norm",
        "is_augmentation",
        "activation_func",
        "use_skip",
        "optimizer",
        "batch_size",
        "num_epochs",
        "learning_rate",
        "seed",
    )

    def get_config(self):
        """Everything that determines what ``fit`` produces (the experiment cache's key)."""
        return {"class": type(self).__name__, **{k: getattr(self, k) for k in self.CONFIG_KEYS}}

    def summary(self):
        self._require_model()
        self.model.summary()

    def _require_model(self):
        if self.model is None:
            raise RuntimeError("Call build_cnn() (or load()) first.")

    # ---- training -----------------------------------------------------------------------------
    def _make_optimizer(self, steps_per_epoch, num_epochs):
        """The optimizer named in the constructor; the training's length is for learning-rate schedules."""
        return OPTIMIZERS[self.optimizer](learning_rate=self.learning_rate)

    def _trainer(self):
        """The Keras model that ``fit`` trains; its weights are ``self.model``'s."""
        return self.model

    def _train_dataset(self, X, y, batch_size):
        """A shuffled, batched ``tf.data.Dataset`` of (images, one-hot labels)."""
        onehot = keras.utils.to_categorical(y, self.num_classes).astype(np.float32)
        return (
            tf.data.Dataset.from_tensor_slices((X, onehot))
            .shuffle(len(X), seed=self.seed, reshuffle_each_iteration=True)
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )

    def _callbacks(self, data_manager, num_epochs):
        """The callbacks that the model's own options need (early stopping, robust validation)."""
        return []

    def fit(self, data_manager, batch_size=None, num_epochs=None, callbacks=()):
        """Trains on ``data_manager.X_train`` and validates on ``X_valid`` after every epoch.

        ``callbacks``: extra Keras callbacks, run after the model's own (e.g. a progress recorder).

        Returns and keeps ``self.history``: a dict of per-epoch lists (``loss``, ``accuracy``,
        ``val_loss``, ``val_accuracy`` and whatever the subclass adds). ``self.best_epoch`` is the
        1-based epoch whose weights were kept when an ``EarlyStopping`` callback ran, else None.
        """
        self._require_model()
        batch_size = batch_size or self.batch_size
        num_epochs = num_epochs or self.num_epochs
        keras.utils.set_random_seed(self.seed)
        steps_per_epoch = int(np.ceil(len(data_manager.X_train) / batch_size))
        callbacks = [*self._callbacks(data_manager, num_epochs), *callbacks]
        trainer = self._trainer()
        trainer.compile(
            optimizer=self._make_optimizer(steps_per_epoch, num_epochs),
            loss=keras.losses.CategoricalCrossentropy(),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        )
        history = trainer.fit(
            self._train_dataset(data_manager.X_train, data_manager.y_train, batch_size),
            validation_data=(
                data_manager.X_valid,
                keras.utils.to_categorical(data_manager.y_valid, self.num_classes).astype(np.float32),
            ),
            epochs=num_epochs,
            shuffle=False,  # the dataset reshuffles itself every epoch
            verbose=int(self.verbose),  # 1: progress bar, 2: one line per epoch
            callbacks=callbacks,
        )
        self.history = {k: [float(v) for v in vs] for k, vs in history.history.items()}
        self.best_epoch = next(
            (cb.best_epoch + 1 for cb in callbacks if isinstance(cb, keras.callbacks.EarlyStopping)), None
        )
        return self.history

    # ---- evaluation ---------------------------------------------------------------------------
    def predict(self, X, batch_size=256):
        """(N, H, W, C) images in [-1, 1] -> (N,) integer labels."""
        self._require_model()
        return np.concatenate(
            [
                np.argmax(self.model(X[i : i + batch_size], training=False), axis=1)
                for i in range(0, len(X), batch_size)
            ]
        )

    def compute_accuracy(self, X, y, batch_size=64):
        """Fraction of ``X`` whose predicted label equals ``y``."""
        accuracy = float(np.mean(self.predict(X, batch_size=batch_size) == np.asarray(y)))
        if self.verbose:
            print(f"{len(X)} images - accuracy: {accuracy:.4f}")
        return accuracy

    def plot_progress(self):
        """Accuracy and loss per epoch, train and validation (the kept epoch dotted, if any)."""
        if not self.history:
            raise RuntimeError("No history: call fit() first.")
        plot_histories({self.name: self.history}, self.name, best_epochs={self.name: self.best_epoch})

    def plot_prediction(self, X, y, classes, tile_shape=(5, 5), seed=SEED):
        """A grid of random images titled with prediction and truth (red where wrong)."""
        rows, cols = tile_shape
        idx = np.random.RandomState(seed).choice(len(X), min(rows * cols, len(X)), replace=False)
        predictions = self.predict(X[idx])
        fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows))
        for ax in axes.ravel()[len(idx) :]:
            ax.axis("off")
        for ax, i, pred in zip(axes.ravel(), idx, predictions):
            ax.imshow(to_display(X[i]))
            ax.set_title(
                f"pred: {classes[pred]}\ntrue: {classes[y[i]]}",
                fontsize=8,
                color="black" if pred == y[i] else "red",
            )
            ax.axis("off")
        plt.tight_layout()
        plt.show()

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path):
        """Writes ``self.model`` to ``path`` (``.h5``) atomically: temporary file, then rename."""
        self._require_model()
        save_model(self.model, path)

    def load(self, path):
        """Loads a model saved by ``save`` (or any ``.h5`` Keras model) into ``self.model``."""
        self.model = keras.models.load_model(path, compile=False)
        return self.model


# --------------------------------------------------------------------------------------------------
# 3. YourModel
# --------------------------------------------------------------------------------------------------
class PadCropFlip(layers.Layer):
    """Random whole-pixel shifts and horizontal flips, one draw per image (training only).

    Each image is padded by ``pad`` pixels on every side by reflection, cropped back to its size at
    a random integer offset in [0, 2 * pad] along each axis, and flipped left-right with
    probability 1/2. Every output pixel is an input pixel: nothing is interpolated, so the images
    stay as sharp as the validation and test images. (N, H, W, C) -> (N, H, W, C).
    """

    def __init__(self, pad=4, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.pad = pad
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        n, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
        padded = tf.pad(images, [[0, 0], [self.pad, self.pad], [self.pad, self.pad], [0, 0]], mode="REFLECT")
        offsets = keras.random.randint((n, 2), 0, 2 * self.pad + 1, seed=self.seed_generator)
        rows = offsets[:, :1] + tf.range(height)[None, :]  # (N, H): the padded rows each image keeps
        cols = offsets[:, 1:] + tf.range(width)[None, :]  # (N, W)
        cropped = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
        flip = keras.random.uniform((n, 1, 1, 1), seed=self.seed_generator) < 0.5
        return tf.where(flip, tf.reverse(cropped, axis=[2]), cropped)

    def get_config(self):
        return {**super().get_config(), "pad": self.pad}


def predict_flip_tta(model, X, batch_size=500):
    """Test-time augmentation by horizontal flip: the mean of ``model``'s softmax outputs on each
    image and on its mirror image. model: a Keras model; X: (N, H, W, C). Returns (N,) labels.
    An evaluation-only figure, reported beside the plain one (training flips images too)."""
    labels = []
    for i in range(0, len(X), batch_size):
        batch = tf.convert_to_tensor(X[i : i + batch_size])
        probabilities = model(batch, training=False) + model(tf.reverse(batch, axis=[2]), training=False)
        labels.append(np.argmax(probabilities, axis=1))
    return np.concatenate(labels)


AUGMENTERS = ("crop_flip", "resample")


def build_augmenter(seed=SEED, kind="crop_flip"):
    """The training-batch augmenter: (N, H, W, C) in [-1, 1] -> the same, applied to training batches only.

    ``kind="crop_flip"``: ``PadCropFlip`` (reflect-pad 4, random crop, horizontal flip), no
    interpolation. ``kind="resample"``: the first version, random flip, translation (10%), rotation
    (0.05 turn) and zoom (10%) as three Keras layers that each resample the image bilinearly, so an
    image is interpolated three times and comes out blurred (Question 3.6 measures it).

    Keras layers rather than ``ImageDataGenerator``: they run inside the ``tf.data`` pipeline on whole
    batches (fast, seeded, no Python generator) and, kept outside the network, leave the saved ``.h5``
    model a plain classifier.
    """
    if kind == "crop_flip":
        return PadCropFlip(pad=4, seed=seed, name="augmenter")
    if kind != "resample":
        raise ValueError(f"augmenter={kind!r}; allowed: {', '.join(map(repr, AUGMENTERS))}.")
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=seed),
            layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed + 1),
            layers.RandomRotation(0.05, fill_mode="reflect", seed=seed + 2),
            layers.RandomZoom(0.1, fill_mode="reflect", seed=seed + 3),
        ],
        name="augmenter",
    )


@dataclass(frozen=True)
class EarlyStopping(Option):
    """Early stopping: training stops once the watched validation accuracy has not increased for
    ``patience`` epochs, counting from epoch ``start_from_epoch`` (0-based: the noisy first epochs of a
    warm-up cannot stop a run), and the best epoch's weights are restored (with adversarial training its
    checkpoint rule chooses them instead). It describes Keras's ``keras.callbacks.EarlyStopping`` and builds
    a fresh one for each fit (``callback``)."""

    patience: int
    start_from_epoch: int = 0

    def __post_init__(self):
        self.require(is_count(self.patience, 1), "patience", "an integer >= 1")
        self.require(is_count(self.start_from_epoch, 0), "start_from_epoch", "an integer >= 0")

    def callback(self, monitor, restore_best_weights, verbose):
        """Keras's callback, watching the logged metric ``monitor`` (an accuracy: higher is better)."""
        return keras.callbacks.EarlyStopping(
            monitor=monitor,
            mode="max",
            patience=self.patience,
            start_from_epoch=self.start_from_epoch,
            restore_best_weights=restore_best_weights,
            verbose=verbose,
        )


@dataclass(frozen=True)
class CosineSchedule(Option):
    """Cosine decay of the learning rate to 0 over the run, after a linear warm-up from 0 over
    ``warmup_epochs`` (0: none). It describes ``keras.optimizers.schedules.CosineDecay`` and builds it for
    each fit, whose length in steps it needs (``learning_rate``)."""

    warmup_epochs: int = 0

    def __post_init__(self):
        self.require(is_count(self.warmup_epochs, 0), "warmup_epochs", "an integer >= 0")

    def learning_rate(self, peak, steps_per_epoch, num_epochs):
        """The schedule over ``num_epochs * steps_per_epoch`` steps, rising to ``peak`` after the warm-up."""
        warmup = self.warmup_epochs * steps_per_epoch
        return keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else peak,
            num_epochs * steps_per_epoch - warmup,
            warmup_target=peak if warmup else None,
            warmup_steps=warmup,
        )


@dataclass(frozen=True)
class WeightDecay(Option):
    """Decoupled weight decay of the optimizer at ``rate`` (Keras 3 applies it as AdamW does)."""

    rate: float

    def __post_init__(self):
        self.require(self.rate > 0, "rate", "> 0")


@dataclass(frozen=True)
class WeightAveraging(Option):
    """Weight averaging (Polyak averaging; Keras's ``use_ema``): after every step ``ema = momentum * ema +
    (1 - momentum) * w``. Validation, the callbacks (the checkpoint rule, early stopping) and the saved
    network see the averaged weights; training goes on from the raw ones
    (``keras.callbacks.SwapEMAWeights``). Only trainable weights are averaged: batch norm keeps the moving
    statistics the training steps collected."""

    momentum: float

    def __post_init__(self):
        self.require(0.0 < self.momentum < 1.0, "momentum", "in (0, 1)")


@dataclass(frozen=True)
class LabelSmoothing(Option):
    """Training targets ``(1 - alpha) * onehot + alpha / num_classes`` (the validation loss stays on the
    hard labels)."""

    alpha: float

    def __post_init__(self):
        self.require(0.0 < self.alpha < 1.0, "alpha", "in (0, 1)")


@dataclass(frozen=True)
class InitialWeights(Option):
    """Training starts from the weights of the saved ``.h5`` network at ``path`` (same architecture). The
    configuration records the file's content (sha256), not its path, which differs between output folders:
    the experiment cache retrains when that file changes."""

    path: str

    def __post_init__(self):
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"InitialWeights(path={self.path!r}): no such model file.")

    def get_config(self):
        return {"sha256": file_sha256(self.path)}


class YourModel(DefaultModel):
    """Blocks of [conv, BN, act, conv, BN, (+ skip), act, average pool, dropout], then a softmax head.

    Block ``i`` (0-based) has ``feature_maps * 2**i`` maps; the skip connection adds the first
    conv's output to the second BN's output (``one_block.png``). ``batch_norm=None``/``False``
    leaves out the BN layers, ``drop_rate=0`` the dropout. ``is_augmentation`` augments the training
    batches with ``augmenter``: ``"crop_flip"`` (whole-pixel shifts and flips) or ``"resample"`` (the first,
    blurring version); see ``build_augmenter``.

    Keyword options, each an object or None (off, the default; see the module docstring), composable with
    each other and with augmentation; all run through ``RegularizedTrainer.train_step`` or Keras's own
    callbacks and optimizer, while ``self.model`` stays a plain functional model:

    - ``early_stopping``: an ``EarlyStopping``, on ``val_accuracy`` (on ``val_pgd_accuracy`` with adversarial
      training, whose checkpoint rule then chooses the weights kept). Off unless passed, augmentation
      included: Question 3.5's patience 3 is written at its runs' calls.
    - ``schedule``: a ``CosineSchedule``; None: the constant ``learning_rate``.
    - ``weight_decay``: a ``WeightDecay``; ``weight_averaging``: a ``WeightAveraging``.
    - ``label_smoothing``: a ``LabelSmoothing``; ``mixup``: a ``training.Mixup``.
    - ``adversarial``: a ``training.AdversarialTraining`` (Madry et al. 2018). Batches are fully
      adversarial: the min-max objective trains on the worst case in the eps ball only; mixing in clean
      examples trades robustness for clean accuracy, which Question 3.9 does not ask for. Its
      ``validation_steps`` (20 by default, the evaluation attack of Question 3.9: with step 0.002, ten
      steps move a pixel by at most 0.02 < eps) measure each epoch's ``val_pgd_accuracy``.
    - ``sam``: a ``training.SAM`` (Foret et al. 2021), or on a random fraction of the steps.
    - ``initial_weights``: an ``InitialWeights``.
    """

    # keyword -> the class of its option object (the keyword's value is one, or None: off)
    OPTIONS = {
        "early_stopping": EarlyStopping,
        "schedule": CosineSchedule,
        "weight_decay": WeightDecay,
        "weight_averaging": WeightAveraging,
        "label_smoothing": LabelSmoothing,
        "mixup": Mixup,
        "adversarial": AdversarialTraining,
        "sam": SAM,
        "initial_weights": InitialWeights,
    }

    def __init__(
        self,
        name="network1",
        width=32,
        height=32,
        depth=3,
        num_blocks=2,
        feature_maps=32,
        num_classes=4,
        drop_rate=0.2,
        batch_norm=None,
        is_augmentation=False,
        activation_func="relu",
        use_skip=True,
        optimizer="adam",
        batch_size=10,
        num_epochs=20,
        learning_rate=0.0001,
        verbose=True,
        *,
        seed=SEED,
        augmenter="crop_flip",
        early_stopping=None,
        schedule=None,
        weight_decay=None,
        weight_averaging=None,
        label_smoothing=None,
        mixup=None,
        adversarial=None,
        sam=None,
        initial_weights=None,
    ):
        super().__init__(  # the course's arguments, in the assignment's order
            *(name, width, height, depth, num_blocks, feature_maps, num_classes, drop_rate, batch_norm),
            *(is_augmentation, activation_func, use_skip, optimizer, batch_size, num_epochs, learning_rate),
            verbose,
            seed=seed,
        )
        if augmenter not in AUGMENTERS:
            raise ValueError(f"augmenter={augmenter!r}; allowed: {', '.join(map(repr, AUGMENTERS))}.")
        self.augmenter = augmenter
        given = locals()  # the options, by their keywords
        for keyword, kind in self.OPTIONS.items():
            if not (given[keyword] is None or isinstance(given[keyword], kind)):
                raise ValueError(f"{keyword}={given[keyword]!r}; allowed: a {kind.__name__} or None (off).")
            setattr(self, keyword, given[keyword])

    def build_cnn(self):
        keras.utils.set_random_seed(self.seed)
        inputs = keras.Input(shape=(self.height, self.width, self.depth), name="images")
        x = inputs
        for i in range(self.num_blocks):
            x = self._block(x, self.feature_maps * 2**i, f"block{i + 1}")
        x = layers.Flatten(name="flatten")(x)
        logits = layers.Dense(self.num_classes, name="logits")(x)
        outputs = layers.Activation("softmax", name="probabilities")(logits)
        self.model = keras.Model(inputs, outputs, name=self.name)
        if self.initial_weights:
            start = keras.models.load_model(self.initial_weights.path, compile=False)
            self.model.set_weights(start.get_weights())
        return self.model

    def _block(self, x, maps, prefix):
        """One block: (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), maps)."""
        conv = dict(kernel_size=(3, 3), strides=(1, 1), padding="same")
        first = layers.Conv2D(maps, name=f"{prefix}_conv1", **conv)(x)
        x = self._batch_norm(first, f"{prefix}_bn1")
        x = layers.Activation(self.activation_func, name=f"{prefix}_act1")(x)
        x = layers.Conv2D(maps, name=f"{prefix}_conv2", **conv)(x)
        x = self._batch_norm(x, f"{prefix}_bn2")
        if self.use_skip:
            x = layers.Add(name=f"{prefix}_skip")([x, first])
        x = layers.Activation(self.activation_func, name=f"{prefix}_act2")(x)
        x = layers.AveragePooling2D(pool_size=(2, 2), strides=(2, 2), padding="same", name=f"{prefix}_pool")(
            x
        )
        if self.drop_rate > 0:
            x = layers.Dropout(self.drop_rate, name=f"{prefix}_dropout")(x)
        return x

    def _batch_norm(self, x, name):
        # momentum 0.9 (PyTorch's default) lets the moving statistics follow the weights
        # within an epoch of ~60 steps; Keras's 0.99 lags about two epochs behind.
        return layers.BatchNormalization(momentum=0.9, name=name)(x) if self.batch_norm else x

    CONFIG_KEYS = DefaultModel.CONFIG_KEYS + ("augmenter",)

    def get_config(self):
        """The course's arguments, the seed and the augmenter, and each option's ``get_config`` under its
        keyword (None where it is off)."""
        config = super().get_config()
        for keyword in self.OPTIONS:
            option = getattr(self, keyword)
            config[keyword] = None if option is None else option.get_config()
        return config

    def fit(self, data_manager, batch_size=None, num_epochs=None, callbacks=()):
        history = super().fit(data_manager, batch_size=batch_size, num_epochs=num_epochs, callbacks=callbacks)
        checkpoint = getattr(self, "_checkpoint", None)
        if checkpoint is not None:
            self.best_epoch = checkpoint.best_epoch + 1
        return history

    def _make_optimizer(self, steps_per_epoch, num_epochs):
        kwargs = {"weight_decay": self.weight_decay.rate} if self.weight_decay else {}
        if self.weight_averaging:
            kwargs.update(use_ema=True, ema_momentum=self.weight_averaging.momentum)
        learning_rate = self.learning_rate
        if self.schedule:
            learning_rate = self.schedule.learning_rate(self.learning_rate, steps_per_epoch, num_epochs)
        return OPTIMIZERS[self.optimizer](learning_rate=learning_rate, **kwargs)

    def _trainer(self):
        if not (self.mixup or self.adversarial or self.sam):
            return self.model
        return RegularizedTrainer(
            self.model, mixup=self.mixup, adversarial=self.adversarial, sam=self.sam, seed=self.seed
        )

    def _train_dataset(self, X, y, batch_size):
        dataset = super()._train_dataset(X, y, batch_size)
        if self.label_smoothing:
            a, k = self.label_smoothing.alpha, self.num_classes
            dataset = dataset.map(lambda images, onehot: (images, (1.0 - a) * onehot + a / k))
        if self.is_augmentation:
            augmenter = build_augmenter(self.seed, self.augmenter)
            # one call at a time: the augmenter's seed state then advances in batch order; parallel
            # calls race on it and two runs with the same seed see different augmentations
            dataset = dataset.map(lambda images, labels: (augmenter(images, training=True), labels)).prefetch(
                tf.data.AUTOTUNE
            )
        return dataset

    def _callbacks(self, data_manager, num_epochs):
        callbacks, self._checkpoint = [], None
        if self.weight_averaging:
            # first, so that every later callback (and validation) sees the averaged weights
            callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
        if self.adversarial:
            self._checkpoint = RobustCheckpoint(tolerance=self.adversarial.tolerance)
            callbacks.append(
                RobustValidation(
                    data_manager.X_valid,
                    data_manager.y_valid,
                    eps=self.adversarial.eps,
                    k=self.adversarial.validation_steps,
                    eta=self.adversarial.step_size,
                )
            )
            callbacks.append(self._checkpoint)
        if self.early_stopping:
            callbacks.append(
                self.early_stopping.callback(
                    monitor="val_pgd_accuracy" if self.adversarial else "val_accuracy",
                    restore_best_weights=not self.adversarial,  # adversarial runs: the checkpoint restores
                    verbose=int(self.verbose),
                )
            )
        return callbacks
