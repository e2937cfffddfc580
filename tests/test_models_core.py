"""models.py, part 1 (issue 3): the data manager, DefaultModel and YourModel.

Everything runs on tiny data: a handful of images written to a temporary folder for the data manager,
random arrays for the networks (32x32 or 16x16, a few dozen images, 1 to 6 epochs of a 1-block model).
Expected parameter counts are computed here from the block formula, not read from models.py.
"""

import json
import math
import os
import re
import warnings

import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tensorflow import keras  # noqa: E402

import experiments  # noqa: E402
import models  # noqa: E402
from conftest import small_net  # noqa: E402
from models import (  # noqa: E402
    SAM,
    AdversarialTraining,
    AnimalsDatasetManager,
    CosineSchedule,
    DefaultModel,
    EarlyStopping,
    InitialWeights,
    LabelSmoothing,
    Mixup,
    SimplePreprocessor,
    WeightAveraging,
    WeightDecay,
    YourModel,
)

# ------------------------------------------------------------------------------------------------
# The image tree: class -> [(file name, (height, width), BGR colour or None for a corrupt file)]
# Classes are created in unsorted order; each image is one uniform colour, unique per file, so the
# loaded pixels tell which file was read and in which order.
# ------------------------------------------------------------------------------------------------
TREE = {
    "zebra": [
        ("z1.png", (40, 30), (10, 200, 30)),
        ("z2.jpg", (64, 64), (200, 30, 90)),
        ("z3.png", (17, 50), (60, 60, 160)),
    ],
    "ant": [
        ("a_red.png", (30, 45), (0, 0, 255)),
        ("b.jpg", (50, 50), (120, 40, 40)),
        ("c.png", (20, 60), (30, 140, 220)),
        ("d.jpeg", (33, 33), (220, 220, 20)),
        ("e.PNG", (100, 80), (90, 10, 160)),
    ],
    "mole": [
        ("0_corrupt.jpg", None, None),
        ("m1.png", (32, 32), (250, 250, 250)),
        ("m2.jpg", (48, 24), (5, 5, 5)),
        ("m3.png", (70, 35), (100, 180, 60)),
        ("m4.jpg", (45, 90), (180, 100, 60)),
    ],
}
TEXT_FILE = ("mole", "notes.txt")
SORTED_CLASSES = ["ant", "mole", "zebra"]


def readable(label):
    return [entry for entry in TREE[label] if entry[1] is not None]


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("animals")
    for label, entries in TREE.items():
        (root / label).mkdir()
        for name, size, bgr in entries:
            path = root / label / name
            if size is None:
                path.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG image at all")
            else:
                image = np.empty((*size, 3), np.uint8)
                image[:] = bgr
                assert cv2.imwrite(str(path), image)
    (root / TEXT_FILE[0] / TEXT_FILE[1]).write_text("not an image\n")
    return root


def load_tree(root, **kwargs):
    """Loads the tree; returns (manager, list of the warnings raised)."""
    manager = AnimalsDatasetManager([SimplePreprocessor(32, 32)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager.load(models.create_label_folder_dict(str(root)), **kwargs)
    return manager, [w for w in caught if issubclass(w.category, UserWarning)]


# ------------------------------------------------------------------------------------------------
# Data manager
# ------------------------------------------------------------------------------------------------
def test_load_counts_classes_order_and_corrupt_warning(image_tree, capsys):
    manager, caught = load_tree(image_tree, verbose=2)
    out = capsys.readouterr().out
    expected_labels = [label for label in SORTED_CLASSES for _ in readable(label)]
    assert list(manager.labels) == expected_labels
    assert manager.data.shape == (len(expected_labels), 32, 32, 3)
    assert manager.data.dtype == np.uint8
    # files in name order: each uniform image keeps its colour (RGB after loading)
    expected_rgb = np.array([entry[2][::-1] for label in SORTED_CLASSES for entry in readable(label)])
    np.testing.assert_allclose(
        manager.data.reshape(len(expected_rgb), -1, 3).mean(axis=1), expected_rgb, atol=4
    )
    # one warning that counts the single corrupt file (the .txt file is not an image, not "unreadable")
    unreadable = [w for w in caught if "unreadable" in str(w.message)]
    assert len(unreadable) == 1, [str(w.message) for w in caught]
    assert re.search(r"\b1 unreadable", str(unreadable[0].message))
    for label in SORTED_CLASSES:
        assert re.search(rf"^{label} \d+$", out, re.M), out
    assert "Processed 2/500" in out and "Processed 4/500" in out


def test_max_num_images_takes_the_first_readable_files(image_tree, capsys):
    manager, _ = load_tree(image_tree, max_num_images=2)
    assert list(manager.labels) == ["ant", "ant", "mole", "mole", "zebra", "zebra"]
    first_two = np.array([entry[2][::-1] for label in SORTED_CLASSES for entry in readable(label)[:2]])
    np.testing.assert_allclose(manager.data.reshape(6, -1, 3).mean(axis=1), first_two, atol=4)
    assert "Processed" not in capsys.readouterr().out  # verbose=-1 by default


def test_rgb_order_and_scaling(image_tree):
    manager, _ = load_tree(image_tree)
    raw = manager.data.copy()
    manager.process_data_label()
    assert list(manager.classes) == SORTED_CLASSES
    assert list(manager.labels) == [i for i, label in enumerate(SORTED_CLASSES) for _ in readable(label)]
    assert manager.data.dtype == np.float32
    assert manager.data.min() >= -1.0 and manager.data.max() <= 1.0
    np.testing.assert_allclose(manager.data, raw.astype(np.float32) / 127.5 - 1.0, rtol=0, atol=1e-6)
    # "a_red.png" (BGR (0, 0, 255)) is the first image: red, i.e. channel 0 high, in RGB
    red = manager.data[0]
    np.testing.assert_array_equal(red[..., 0], 1.0)
    np.testing.assert_array_equal(red[..., 1:], -1.0)
    white, black = manager.data[len(readable("ant"))], manager.data[len(readable("ant")) + 1]
    np.testing.assert_array_equal(white, np.float32(250) / np.float32(127.5) - np.float32(1.0))
    assert np.all(black <= 5 / 127.5 - 1.0 + 4 / 127.5)


def test_preprocessor_resizes_and_converts_bgr_to_rgb():
    image = np.zeros((7, 11, 3), np.uint8)
    image[..., 0] = 255  # blue in BGR
    out = SimplePreprocessor(5, 3).preprocess(image)
    assert out.shape == (3, 5, 3)
    assert np.all(out[..., 2] == 255) and np.all(out[..., :2] == 0)


def test_split_is_deterministic_on_loaded_images(image_tree):
    splits = []
    for _ in range(2):
        manager, _ = load_tree(image_tree)
        manager.process_data_label()
        manager.train_valid_test_split(train_size=0.5, test_size=0.25)
        splits.append(manager)
    a, b = splits
    for name in ["X_train", "y_train", "X_valid", "y_valid", "X_test", "y_test"]:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert len(a.X_train) + len(a.X_valid) + len(a.X_test) == len(a.data)


def dummy_manager(n=5000):
    manager = AnimalsDatasetManager()
    manager.data = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    manager.labels = np.arange(n) % 10
    return manager


def test_split_arithmetic_4000_500_500():
    manager = dummy_manager()
    manager.train_valid_test_split()
    assert (len(manager.X_train), len(manager.X_valid), len(manager.X_test)) == (4000, 500, 500)
    ids = [getattr(manager, name).ravel().astype(int) for name in ["X_train", "X_valid", "X_test"]]
    assert sorted(np.concatenate(ids)) == list(range(5000))
    for name, part in zip(["y_train", "y_valid", "y_test"], ids):
        np.testing.assert_array_equal(getattr(manager, name), part % 10)
    # the course's arithmetic, seeded with rand_seed=33 in both calls
    rest, test = train_test_split(np.arange(5000), test_size=0.1, random_state=33)
    train, valid = train_test_split(rest, test_size=(1 - 0.9) / (1 - 0.9 + 0.8), random_state=33)
    for expected, part in zip([train, valid, test], ids):
        np.testing.assert_array_equal(part, expected)
    # same indices on a second call and on a second manager
    again = dummy_manager()
    again.train_valid_test_split()
    manager.train_valid_test_split()
    for name in ["X_train", "X_valid", "X_test"]:
        np.testing.assert_array_equal(getattr(manager, name), getattr(again, name))


def test_next_batch():
    manager = dummy_manager(100)
    manager.train_valid_test_split()
    x, y = manager.next_batch(16)
    assert x.shape == (16, 1, 1, 1) and y.shape == (16,)
    assert len(np.unique(x)) == 16
    assert set(x.ravel()) <= set(manager.X_train.ravel())


def test_missing_dataset_folder_names_path_and_env_var(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError) as info:
        models.create_label_folder_dict(str(missing))
    assert str(missing) in str(info.value) and "ANIMALS_DIR" in str(info.value)
    assert "\n" not in str(info.value)  # one line under the notebook's cell


def test_folder_without_class_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        models.create_label_folder_dict(str(tmp_path))


@pytest.mark.parametrize("content", [None, "notes.txt"], ids=["empty", "only-text"])
def test_class_folder_without_images(tmp_path, content):
    (tmp_path / "cats").mkdir()
    image = np.full((8, 8, 3), 100, np.uint8)
    assert cv2.imwrite(str(tmp_path / "cats" / "c.png"), image)
    (tmp_path / "dogs").mkdir()
    if content:
        (tmp_path / "dogs" / content).write_text("x")
    manager = AnimalsDatasetManager([SimplePreprocessor(8, 8)])
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "dogs"))):
        manager.load(models.create_label_folder_dict(str(tmp_path)))


def test_missing_class_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gone"))):
        AnimalsDatasetManager().load({"gone": str(tmp_path / "gone")})


# ------------------------------------------------------------------------------------------------
# Architecture: parameter counts from the block formula
# ------------------------------------------------------------------------------------------------
def expected_param_counts(num_blocks, feature_maps, batch_norm, num_classes, size=32, depth=3):
    """(total, trainable) from the block formula: conv 3x3 = 9*cin*cout + cout, BN = 4c (2c trainable)."""
    total = trainable = 0
    cin, side = depth, size
    for i in range(num_blocks):
        c = feature_maps * 2**i
        convs = (9 * cin * c + c) + (9 * c * c + c)
        total += convs + (8 * c if batch_norm else 0)
        trainable += convs + (4 * c if batch_norm else 0)
        cin, side = c, math.ceil(side / 2)
    dense = side * side * cin * num_classes + num_classes
    return total + dense, trainable + dense


def layer_types(model):
    return [type(layer).__name__ for layer in model.layers if type(layer).__name__ != "InputLayer"]


def expected_layer_types(num_blocks, use_skip, batch_norm, drop_rate):
    bn = ["BatchNormalization"] if batch_norm else []
    block = (
        ["Conv2D"]
        + bn
        + ["Activation", "Conv2D"]
        + bn
        + (["Add"] if use_skip else [])
        + ["Activation", "AveragePooling2D"]
        + (["Dropout"] if drop_rate > 0 else [])
    )
    return block * num_blocks + ["Flatten", "Dense", "Activation"]


def test_baseline_parameter_count_and_layers():
    model = DefaultModel(num_classes=10, verbose=False).build_cnn()
    assert model.count_params() == 106_538
    assert layer_types(model) == [
        "Conv2D",
        "Conv2D",
        "AveragePooling2D",
        "Conv2D",
        "Conv2D",
        "AveragePooling2D",
        "Flatten",
        "Dense",
    ]
    assert model.output_shape == (None, 10)
    assert model.layers[-1].activation is keras.activations.softmax


def test_positional_arguments_follow_the_assignments_order():
    """The assignment calls the constructor positionally: each argument must reach the network it builds."""
    net = YourModel("n", 16, 24, 1, 2, 8, 5, 0.3, True, False, "elu", False, "sgd", 7, 2, 0.01, False)
    model = net.build_cnn()
    assert model.name == "n" and model.input_shape == (None, 24, 16, 1) and model.output_shape == (None, 5)
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert [conv.filters for conv in convs] == [8, 8, 16, 16]
    assert all(
        conv.activation is keras.activations.linear for conv in convs
    )  # the activation is its own layer
    activations = {
        layer.activation.__name__ for layer in model.layers if type(layer).__name__ == "Activation"
    }
    assert activations == {"elu", "softmax"}
    assert {layer.rate for layer in model.layers if type(layer).__name__ == "Dropout"} == {0.3}
    assert "BatchNormalization" in layer_types(model) and "Add" not in layer_types(model)
    optimizer = net._make_optimizer(10, 1)
    assert type(optimizer).__name__ == "SGD" and float(optimizer.learning_rate) == pytest.approx(0.01)
    rng = np.random.RandomState(0)
    manager = AnimalsDatasetManager()
    manager.X_train, manager.y_train = (
        rng.uniform(-1, 1, (15, 24, 16, 1)).astype(np.float32),
        rng.randint(0, 5, 15),
    )
    manager.X_valid, manager.y_valid = manager.X_train[:5], manager.y_train[:5]
    counter = BatchCounter()
    history = net.fit(manager, callbacks=[counter])
    assert len(history["loss"]) == 2 and counter.batches == [3, 3]  # batch_size 7: 15 images in 3 batches


class BatchCounter(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.batches = [*getattr(self, "batches", []), 0]

    def on_train_batch_end(self, batch, logs=None):
        self.batches[-1] += 1


@pytest.mark.parametrize(
    "num_blocks, feature_maps, use_skip, batch_norm, drop_rate, num_classes",
    [
        (1, 8, True, True, 0.2, 4),
        (2, 8, False, None, 0.0, 3),
        (3, 32, True, True, 0.0, 10),  # the notebook's configuration
        (3, 4, False, False, 0.5, 4),
        (5, 2, True, True, 0.1, 2),  # 32 -> 1 pixel: the deepest allowed for 32x32
    ],
)
def test_your_model_parameter_counts_and_layers(
    num_blocks, feature_maps, use_skip, batch_norm, drop_rate, num_classes
):
    net = YourModel(
        num_blocks=num_blocks,
        feature_maps=feature_maps,
        use_skip=use_skip,
        batch_norm=batch_norm,
        drop_rate=drop_rate,
        num_classes=num_classes,
        verbose=False,
    )
    model = net.build_cnn()
    total, trainable = expected_param_counts(num_blocks, feature_maps, batch_norm, num_classes)
    assert model.count_params() == total
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == trainable
    assert layer_types(model) == expected_layer_types(num_blocks, use_skip, batch_norm, drop_rate)
    kinds = layer_types(model)
    assert kinds.count("Add") == (num_blocks if use_skip else 0)
    assert kinds.count("BatchNormalization") == (2 * num_blocks if batch_norm else 0)
    assert kinds.count("Dropout") == (num_blocks if drop_rate > 0 else 0)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [layer.filters for layer in convs] == [feature_maps * 2 ** (i // 2) for i in range(2 * num_blocks)]
    for layer in convs:
        assert (tuple(layer.kernel_size), tuple(layer.strides), layer.padding) == ((3, 3), (1, 1), "same")
    for layer in model.layers:
        if isinstance(layer, keras.layers.AveragePooling2D):
            assert (tuple(layer.pool_size), tuple(layer.strides), layer.padding) == ((2, 2), (2, 2), "same")
        if isinstance(layer, keras.layers.Dropout):
            assert layer.rate == drop_rate
    assert model.output_shape == (None, num_classes)
    assert model.layers[-1].activation is keras.activations.softmax


def test_skip_adds_the_first_conv_output():
    """one_block.png: the Add joins the block's first conv output and the second BN output."""
    model = YourModel(num_blocks=2, feature_maps=4, batch_norm=True, verbose=False).build_cnn()
    adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for b, add in enumerate(adds):
        sources = {node.operation.name for node in add._inbound_nodes[0].parent_nodes}
        assert sources == {convs[2 * b].name, bns[2 * b + 1].name}


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
COMMON_ERRORS = [
    (dict(optimizer="adamax_typo"), "adamax_typo"),
    (dict(activation_func="not_an_activation"), "not_an_activation"),
    (dict(drop_rate=-0.1), "-0.1"),
    (dict(drop_rate=1.0), "1.0"),
    (dict(num_blocks=6), "num_blocks=6"),
    (dict(num_blocks=3, width=4, height=16), "num_blocks=3"),
]


@pytest.mark.parametrize("cls", [DefaultModel, YourModel])
@pytest.mark.parametrize("kwargs, named", COMMON_ERRORS, ids=[str(k) for k, _ in COMMON_ERRORS])
def test_value_errors(cls, kwargs, named):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    assert named in str(info.value)


BAD_OPTIONS = [  # an option object with a bad value, and the start of its message
    (EarlyStopping, dict(patience=0), "EarlyStopping(patience=0): patience must be an integer >= 1"),
    (EarlyStopping, dict(patience=2.5), "EarlyStopping(patience=2.5): patience must be an integer >= 1"),
    (
        EarlyStopping,
        dict(patience=3, start_from_epoch=-1),
        "EarlyStopping(start_from_epoch=-1): start_from_epoch",
    ),
    (
        CosineSchedule,
        dict(warmup_epochs=-2),
        "CosineSchedule(warmup_epochs=-2): warmup_epochs must be an integer",
    ),
    (WeightDecay, dict(rate=-1e-4), "WeightDecay(rate=-0.0001): rate must be > 0"),
    (WeightAveraging, dict(momentum=1.0), "WeightAveraging(momentum=1.0): momentum must be in (0, 1)"),
    (WeightAveraging, dict(momentum=0.0), "WeightAveraging(momentum=0.0): momentum must be in (0, 1)"),
    (LabelSmoothing, dict(alpha=1.0), "LabelSmoothing(alpha=1.0): alpha must be in (0, 1)"),
    (Mixup, dict(alpha=-0.5), "Mixup(alpha=-0.5): alpha must be > 0"),
    (Mixup, dict(alpha=0.0), "Mixup(alpha=0.0): alpha must be > 0"),
    (AdversarialTraining, dict(eps=-0.01), "AdversarialTraining(eps=-0.01): eps must be > 0"),
    (
        AdversarialTraining,
        dict(eps=0.03, steps=0),
        "AdversarialTraining(steps=0): steps must be an integer >= 1",
    ),
    (
        AdversarialTraining,
        dict(eps=0.03, step_size=0.0),
        "AdversarialTraining(step_size=0.0): step_size must be > 0",
    ),
    (
        AdversarialTraining,
        dict(eps=0.03, validation_steps=True),
        "AdversarialTraining(validation_steps=True)",
    ),
    (
        AdversarialTraining,
        dict(eps=0.03, tolerance=-0.1),
        "AdversarialTraining(tolerance=-0.1): tolerance must be",
    ),
    (SAM, dict(rho=-0.05), "SAM(rho=-0.05): rho must be > 0"),
    (SAM, dict(rho=0.05, fraction=0.0), "SAM(fraction=0.0): fraction must be in (0, 1]"),
    (SAM, dict(rho=0.05, fraction=1.5), "SAM(fraction=1.5): fraction must be in (0, 1]"),
]


@pytest.mark.parametrize(
    "cls, kwargs, message", BAD_OPTIONS, ids=[f"{c.__name__}{k}" for c, k, _ in BAD_OPTIONS]
)
def test_each_option_object_refuses_a_bad_value_in_one_line(cls, kwargs, message):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text
    assert text.endswith(f"(None instead of a {cls.__name__} turns it off).")


def test_initial_weights_refuse_a_missing_file_in_one_line(tmp_path):
    missing = str(tmp_path / "missing.h5")
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"InitialWeights(path={missing!r}): no such model file")
    ):
        InitialWeights(missing)


def test_an_option_keyword_takes_its_object_or_none_only():
    with pytest.raises(ValueError, match=r"^sam=0\.05; allowed: a SAM or None \(off\)\.$"):
        YourModel(sam=0.05)
    with pytest.raises(ValueError, match="mixup=SAM"):
        YourModel(mixup=SAM(rho=0.05))
    with pytest.raises(TypeError, match="sam_rho"):  # the flat keywords before issue 30 are gone
        YourModel(sam_rho=0.05)
    net = YourModel(mixup=Mixup(alpha=0.2), sam=None)
    assert net.mixup == Mixup(alpha=0.2) and net.sam is None


def test_every_option_is_off_unless_passed():
    """No option is on by default or switched on by another argument: augmentation adds no early stopping."""
    net = YourModel(is_augmentation=True)
    assert all(getattr(net, keyword) is None for keyword in YourModel.OPTIONS)
    assert (
        net.get_config() == YourModel(is_augmentation=True, **dict.fromkeys(YourModel.OPTIONS)).get_config()
    )
    manager = AnimalsDatasetManager()
    manager.X_valid, manager.y_valid = np.zeros((4, 32, 32, 3), np.float32), np.zeros(4, int)
    assert net._callbacks(manager, 40) == [] and net._trainer() is net.model  # no trainer around it


def every_option(tmp_path):
    """Every option on, with values other than their defaults; initial weights from a saved small network."""
    start = small_net()
    start.build_cnn()
    start.save(str(tmp_path / "start.h5"))
    return dict(
        early_stopping=EarlyStopping(patience=4, start_from_epoch=2),
        schedule=CosineSchedule(warmup_epochs=1),
        weight_decay=WeightDecay(rate=1e-4),
        weight_averaging=WeightAveraging(momentum=0.9),
        label_smoothing=LabelSmoothing(alpha=0.1),
        mixup=Mixup(alpha=0.3),
        adversarial=AdversarialTraining(
            eps=0.02, steps=3, step_size=0.005, validation_steps=4, tolerance=0.01
        ),
        sam=SAM(rho=0.05, fraction=0.5),
        initial_weights=InitialWeights(str(tmp_path / "start.h5")),
    )


def test_the_configuration_nests_each_option_and_reads_back(tmp_path):
    """``get_config`` records each option's fields under its keyword (initial weights by their file's
    content); the experiment cache's record of it, JSON, makes the same network again."""
    options = every_option(tmp_path)
    net = small_net(is_augmentation=True, augmenter="resample", **options)
    config = net.get_config()
    assert config["sam"] == {"rho": 0.05, "fraction": 0.5}
    assert config["early_stopping"] == {"patience": 4, "start_from_epoch": 2}
    assert config["initial_weights"] == {"sha256": models.file_sha256(str(tmp_path / "start.h5"))}
    recorded = json.loads(json.dumps(config))
    again = experiments.network_of(
        YourModel, recorded, {config["initial_weights"]["sha256"]: str(tmp_path / "start.h5")}.get
    )
    assert again.get_config() == config
    assert all(getattr(again, keyword) == option for keyword, option in options.items())
    without_file = experiments.network_of(YourModel, recorded)  # the file not found: initial weights off
    assert without_file.initial_weights is None and without_file.get_config() != config


def test_a_configuration_recorded_before_issue_30_reads_as_the_options_it_named():
    course = {k: v for k, v in YourModel(num_classes=10).get_config().items() if k not in YourModel.OPTIONS}
    flat = dict(
        course,
        patience=3,
        patience_from=30,
        lr_schedule="cosine",
        warmup_epochs=2,
        mixup_alpha=0.2,
        adv_eps=0.0,
        adv_k=10,
        sam_rho=0.05,
        sam_fraction=0.5,
        weight_decay=0.0,
        ema_momentum=0.99,
        label_smoothing=0.0,
    )
    net = experiments.network_of(YourModel, flat)
    assert net.num_classes == 10 and net.early_stopping == EarlyStopping(patience=3, start_from_epoch=30)
    assert net.schedule == CosineSchedule(warmup_epochs=2) and net.mixup == Mixup(alpha=0.2)
    assert net.sam == SAM(rho=0.05, fraction=0.5) and net.weight_averaging == WeightAveraging(momentum=0.99)
    assert net.adversarial is None and net.weight_decay is None and net.label_smoothing is None
    assert net.initial_weights is None
    assert experiments.network_of(YourModel, dict(flat, patience=None)).early_stopping is None


def test_error_messages_say_what_is_allowed():
    with pytest.raises(ValueError, match="sgd"):
        DefaultModel(optimizer="bogus")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DefaultModel(drop_rate=1.0)
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        YourModel(num_blocks=6)
    with pytest.raises(ValueError, match="crop_flip"):
        YourModel(augmenter="blur")


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    schedule = CosineSchedule(warmup_epochs=2).learning_rate(1e-3, steps_per_epoch=10, num_epochs=12)
    rates = np.array([float(schedule(step)) for step in range(121)])
    np.testing.assert_allclose(rates[:21], np.linspace(0, 1e-3, 21), rtol=1e-5, atol=1e-12)  # warm-up
    decay = 0.5 * 1e-3 * (1 + np.cos(np.pi * np.arange(101) / 100))  # cosine over the other 100 steps
    np.testing.assert_allclose(rates[20:], decay, rtol=1e-4, atol=1e-9)
    plain = CosineSchedule().learning_rate(1e-3, 10, 12)
    assert float(plain(0)) == pytest.approx(1e-3)  # no warm-up by default
    made = YourModel(
        schedule=CosineSchedule(warmup_epochs=2), learning_rate=1e-3, num_epochs=12, verbose=False
    )
    optimizer = made._make_optimizer(steps_per_epoch=10, num_epochs=12)  # fit's epochs (or the constructor's)
    rates = []
    for step in (0, 10, 20, 120):
        optimizer.iterations.assign(step)
        rates.append(float(optimizer.learning_rate))
    np.testing.assert_allclose(rates, [0, 5e-4, 1e-3, 0], atol=1e-9)
    constant = YourModel(learning_rate=1e-3, verbose=False)._make_optimizer(10, 12)
    assert float(constant.learning_rate) == pytest.approx(1e-3)


def test_early_stopping_watches_from_start_from_epoch():
    manager = AnimalsDatasetManager()
    manager.X_valid, manager.y_valid = np.zeros((4, 32, 32, 3), np.float32), np.zeros(4, int)
    stopping = EarlyStopping(patience=3, start_from_epoch=20)
    (stopper,) = YourModel(early_stopping=stopping, verbose=False)._callbacks(manager, 40)
    assert (stopper.monitor, stopper.patience, stopper.start_from_epoch) == ("val_accuracy", 3, 20)
    assert stopper.restore_best_weights and isinstance(stopper, keras.callbacks.EarlyStopping)
    assert (
        YourModel(early_stopping=stopping)._callbacks(manager, 40)[0] is not stopper
    )  # a fresh one each fit
    adversarial = YourModel(
        adversarial=AdversarialTraining(eps=0.03, tolerance=0.01), early_stopping=EarlyStopping(patience=5)
    )._callbacks(manager, 40)
    assert [type(cb).__name__ for cb in adversarial] == [
        "RobustValidation",
        "RobustCheckpoint",
        "EarlyStopping",
    ]
    assert adversarial[1].tolerance == 0.01
    assert adversarial[2].monitor == "val_pgd_accuracy" and not adversarial[2].restore_best_weights
    averaged = YourModel(
        adversarial=AdversarialTraining(eps=0.03), weight_averaging=WeightAveraging(momentum=0.99)
    )._callbacks(manager, 40)
    # the averaged weights are swapped in first, so that the robust validation and checkpoint see them
    names = [type(cb).__name__ for cb in averaged]
    assert names == ["SwapEMAWeights", "RobustValidation", "RobustCheckpoint"]
    optimizer = YourModel(weight_averaging=WeightAveraging(momentum=0.99))._make_optimizer(10, 20)
    assert optimizer.use_ema and optimizer.ema_momentum == pytest.approx(0.99)
    decayed = YourModel(weight_decay=WeightDecay(rate=1e-4))._make_optimizer(10, 20)
    assert decayed.weight_decay == pytest.approx(1e-4) and not decayed.use_ema


@pytest.mark.parametrize("optimizer", ["adam", "nadam", "adagrad", "rmsprop", "adadelta", "sgd"])
def test_every_optimizer_of_the_assignment_is_accepted(optimizer):
    made = YourModel(optimizer=optimizer, learning_rate=0.02, verbose=False)._make_optimizer(10, 20)
    assert type(made).__name__.lower() == optimizer and float(made.learning_rate) == pytest.approx(0.02)


# ------------------------------------------------------------------------------------------------
# Training on tiny data
# ------------------------------------------------------------------------------------------------
def tiny_manager(n_train=48, n_valid=24, size=16, num_classes=3, seed=0, valid_label=None):
    """Random images whose class is the sign of a per-class colour offset (learnable in a few steps)."""
    rng = np.random.RandomState(seed)
    manager = AnimalsDatasetManager()

    def make(n, labels=None):
        y = rng.randint(0, num_classes, n) if labels is None else labels
        offsets = np.linspace(-0.6, 0.6, num_classes)[y]
        x = np.clip(rng.normal(0, 0.3, (n, size, size, 3)) + offsets[:, None, None, None], -1, 1)
        return x.astype(np.float32), y

    manager.X_train, manager.y_train = make(n_train)
    manager.X_valid, manager.y_valid = make(
        n_valid, None if valid_label is None else np.full(n_valid, valid_label)
    )
    manager.X_test, manager.y_test = make(n_valid)
    return manager


class WeightRecorder(keras.callbacks.Callback):
    """The network's weights at the end of every epoch."""

    def __init__(self, net):
        super().__init__()
        self.net, self.weights = net, []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append([w.copy() for w in self.net.model.get_weights()])


def record_weights(net):
    return WeightRecorder(net)


def assert_same_weights(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_fit_predict_and_accuracy():
    manager = tiny_manager()
    net = small_net(num_epochs=2)
    net.build_cnn()
    history = net.fit(manager)
    assert set(history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 2 for v in history.values())
    assert net.best_epoch is None
    predictions = net.predict(manager.X_valid)
    assert predictions.shape == (len(manager.X_valid),) and np.issubdtype(predictions.dtype, np.integer)
    accuracy = net.compute_accuracy(manager.X_valid, manager.y_valid)
    assert accuracy == np.mean(predictions == manager.y_valid)
    # Keras's own validation accuracy of the last epoch is the same number
    assert accuracy == pytest.approx(history["val_accuracy"][-1], abs=1e-6)


def augmented_run(**options):
    """An augmented run of 8 epochs whose validation labels are of a class never seen in training: its
    validation accuracy cannot improve after epoch 1. Returns (network, weights after each epoch)."""
    manager = tiny_manager(valid_label=2)
    manager.y_train = manager.y_train % 2  # classes 0 and 1 only
    net = small_net(is_augmentation=True, num_epochs=8, **options)
    net.build_cnn()
    recorder = record_weights(net)
    net.fit(manager, callbacks=[recorder])
    return net, recorder.weights


def test_augmentation_with_question_3_5s_early_stopping_stops_and_restores_the_best_epoch():
    """Question 3.5's rule, written at the call: patience 3 stops after 1 + 3 epochs and restores epoch 1."""
    net, weights = augmented_run(early_stopping=EarlyStopping(patience=3))
    assert len(net.history["loss"]) == 4 and np.all(np.isfinite(net.history["loss"]))
    assert net.best_epoch == 1
    assert_same_weights(net.model.get_weights(), weights[0])
    with pytest.raises(AssertionError):  # the restore really changed the weights
        assert_same_weights(net.model.get_weights(), weights[-1])


def test_augmentation_with_early_stopping_off_trains_every_epoch_and_keeps_the_last():
    net, weights = augmented_run(early_stopping=None)
    assert len(net.history["loss"]) == len(weights) == 8 and net.best_epoch is None
    assert_same_weights(net.model.get_weights(), weights[-1])
    with pytest.raises(AssertionError):  # the last epoch's weights are not the first's (the test can fail)
        assert_same_weights(net.model.get_weights(), weights[0])


def test_augmenter_changes_training_batches_only():
    x = np.random.RandomState(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
    augmenter = models.build_augmenter(seed=3)
    augmented = np.asarray(augmenter(x, training=True))
    assert augmented.shape == x.shape
    assert not np.allclose(augmented, x)
    assert augmented.min() >= -1 - 1e-5 and augmented.max() <= 1 + 1e-5
    np.testing.assert_array_equal(np.asarray(augmenter(x, training=False)), x)


def test_crop_flip_augmenter_only_moves_and_mirrors_whole_pixels():
    """Each augmented image is the reflect-padded original, cropped at some integer offset and maybe
    flipped: no pixel value is invented (no interpolation, so no blur); offsets and flips vary."""
    x = np.random.RandomState(1).uniform(-1, 1, (32, 8, 8, 3)).astype(np.float32)
    augmented = np.asarray(models.build_augmenter(seed=5)(x, training=True))
    padded = np.pad(x, [(0, 0), (4, 4), (4, 4), (0, 0)], mode="reflect")
    found = []
    for image, source in zip(augmented, padded):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if np.array_equal(
                image, source[dy : dy + 8, dx : dx + 8][:, ::-1] if flip else source[dy : dy + 8, dx : dx + 8]
            )
        ]
        assert matches, "an augmented image is not a crop of the padded original"
        found.append(matches[0])
    assert len({(dy, dx) for dy, dx, _ in found}) > 10 and 0 < sum(flip for *_, flip in found) < len(found)
    np.testing.assert_array_equal(np.asarray(models.build_augmenter(seed=5)(x, training=False)), x)


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_without_augmentation_restores_best_epoch(patience):
    """Random validation labels and a high learning rate: whatever the validation accuracy does, the
    kept weights are those of its first maximum, and training ran best_epoch + patience epochs (or all)."""
    manager = tiny_manager(seed=patience)
    manager.y_valid = np.random.RandomState(7).randint(0, 3, len(manager.y_valid))
    net = small_net(early_stopping=EarlyStopping(patience=patience), num_epochs=6, learning_rate=0.05)
    net.build_cnn()
    recorder = record_weights(net)
    history = net.fit(manager, callbacks=[recorder])
    val = history["val_accuracy"]
    assert net.best_epoch == int(np.argmax(val)) + 1
    assert len(val) == min(6, net.best_epoch + patience)
    assert_same_weights(net.model.get_weights(), recorder.weights[net.best_epoch - 1])
    assert net.compute_accuracy(manager.X_valid, manager.y_valid) == pytest.approx(max(val), abs=1e-6)


def test_early_stopping_on_a_validation_set_that_cannot_improve():
    manager = tiny_manager(valid_label=2)
    manager.y_train = manager.y_train % 2
    net = small_net(early_stopping=EarlyStopping(patience=2), num_epochs=10, drop_rate=0.0)
    net.build_cnn()
    recorder = record_weights(net)
    history = net.fit(manager, callbacks=[recorder])
    assert len(history["loss"]) == 2 + 1
    assert net.best_epoch == 1
    assert_same_weights(net.model.get_weights(), recorder.weights[0])
    assert net.compute_accuracy(manager.X_valid, manager.y_valid) == pytest.approx(history["val_accuracy"][0])


@pytest.mark.parametrize("cls", [DefaultModel, YourModel])
def test_h5_round_trip(cls, tmp_path):
    manager = tiny_manager()
    net = small_net(cls)
    net.build_cnn()
    net.fit(manager)  # one epoch: batch-norm statistics differ from their initial values
    path = tmp_path / "sub" / f"{cls.__name__}.h5"
    net.save(str(path))
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary file left behind
    loaded = keras.models.load_model(str(path), compile=False)
    x = manager.X_valid
    np.testing.assert_array_equal(
        np.asarray(loaded(x, training=False)), np.asarray(net.model(x, training=False))
    )
    other = small_net(cls)
    other.load(str(path))
    np.testing.assert_array_equal(other.predict(x), net.predict(x))


@pytest.mark.slow
@pytest.mark.parametrize("is_augmentation", [False, True], ids=["plain", "augmented"])
def test_two_seeded_runs_give_identical_weights(is_augmentation):
    """Same seed, same data: shuffling, dropout, augmentation and initialisation repeat exactly."""
    manager = tiny_manager(n_train=128)
    runs = []
    for _ in range(2):
        net = small_net(num_epochs=2, is_augmentation=is_augmentation, seed=7)
        net.build_cnn()
        net.fit(manager)
        runs.append((net.model.get_weights(), net.history))
    (w1, h1), (w2, h2) = runs
    max_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(w1, w2))
    assert max_diff == 0.0, f"seeded runs differ: max |weight difference| = {max_diff:g}"
    assert h1 == h2
    # a different seed gives different weights (the test can fail)
    net = small_net(num_epochs=2, is_augmentation=is_augmentation, seed=8)
    net.build_cnn()
    net.fit(manager)
    assert any(not np.array_equal(a, b) for a, b in zip(w1, net.model.get_weights()))


def test_augmented_training_stream_repeats_for_the_same_seed():
    """The augmented batches of an epoch, built twice after the same seeding as fit() does."""
    manager = tiny_manager(n_train=256)
    net = small_net(is_augmentation=True, seed=7)
    streams = []
    for _ in range(2):
        keras.utils.set_random_seed(net.seed)
        dataset = net._train_dataset(manager.X_train, manager.y_train, 16)
        streams.append([(np.asarray(x), np.asarray(y)) for x, y in dataset])
    for (x1, y1), (x2, y2) in zip(*streams):
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(x1, x2)


def test_plots_and_display_range(monkeypatch):
    monkeypatch.setattr(models.plt, "show", lambda: None)
    np.testing.assert_array_equal(models.to_display(np.array([-1.0, 0.0, 1.0, 1.5])), [0.0, 0.5, 1.0, 1.0])
    manager = tiny_manager()
    net = small_net()
    with pytest.raises(RuntimeError):
        net.plot_progress()
    net.build_cnn()
    net.fit(manager)
    net.plot_progress()
    net.plot_prediction(manager.X_valid, manager.y_valid, ["a", "b", "c"], tile_shape=(2, 3))
    models.plt.close("all")
