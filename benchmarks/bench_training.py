"""Training and attack cost of the Part 3 techniques, as ratios (run by hand, not in CI).

In one process, on the Animals training set (4,000 images, 32x32), the notebook's network (YourModel:
3 blocks, 32 feature maps, batch norm, skip connections, batch 64, Adam 1e-3) is trained once per
configuration: clean, augmentation, mixup (alpha 0.2), SAM (rho 0.05) and PGD-10 adversarial training
(eps 0.0313, eta 0.002). Each run has a warm-up epoch (tracing, caches) and then ``--epochs`` timed
epochs; the median epoch time is reported as a ratio to clean training. An epoch is timed twice: the
training pass alone (first batch to the start of validation) and the whole epoch (with validation, and
for adversarial training the per-epoch PGD validation that picks the checkpoint).

Then our PGD-20 (``attacks.pgd_attack``) and cleverhans 4.0.0's ``projected_gradient_descent`` (tf2,
``rand_init=False``, model_fn = ``attacks.logits_model``) attack the 500 test images with the clean model
(one warm-up call each, then the median of ``--repeats`` calls).

Targets (issue 4, 2 CPU cores): SAM <= 2.1x clean, PGD-10 adversarial training <= 6x clean, our PGD-20
at least 3x faster than cleverhans's. Ratios are only meaningful on an otherwise idle machine: the
load average is recorded and a warning is printed when other jobs are running.

    .venv/bin/python benchmarks/bench_training.py                  # the full benchmark
    .venv/bin/python benchmarks/bench_training.py --epochs 1 --quick   # smoke run: 100 images per class
    .venv/bin/python benchmarks/bench_training.py --npz runs/animals32.npz   # cache the loaded split

Prints a Markdown table and writes ``runs/benchmark.json`` (``--out``).
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import attacks  # noqa: E402
import models  # noqa: E402
from storage import write_json  # noqa: E402

EPS, ETA = 0.0313, 0.002
BASE = dict(
    num_blocks=3,
    feature_maps=32,
    num_classes=10,
    batch_norm=True,
    use_skip=True,
    drop_rate=0.2,
    optimizer="adam",
    learning_rate=1e-3,
    batch_size=64,
    verbose=False,
)
CONFIGS = {  # no early stopping (off unless passed): every timed epoch runs
    "clean": {},
    "augmentation": dict(is_augmentation=True),
    "mixup": dict(mixup=models.Mixup(alpha=0.2)),
    "sam": dict(sam=models.SAM(rho=0.05)),
    "pgd10_adversarial": dict(adversarial=models.AdversarialTraining(eps=EPS, steps=10, step_size=ETA)),
}
TARGETS = {"sam": 2.1, "pgd10_adversarial": 6.0}
PGD_TARGET = 3.0


def machine():
    """nproc, CPU model, versions and the load average when the benchmark starts."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(
        nproc=len(os.sched_getaffinity(0)),
        cpu=cpu,
        python=platform.python_version(),
        tensorflow=tf.__version__,
        keras=keras.__version__,
        load_average=list(os.getloadavg()),
    )


def load_data(args):
    """The seeded 4000/500/500 split (or 800/100/100 with --quick) as a data manager."""
    manager = models.AnimalsDatasetManager([models.SimplePreprocessor(32, 32)])
    names = ["X_train", "y_train", "X_valid", "y_valid", "X_test", "y_test"]
    if args.npz and Path(args.npz).exists():
        with np.load(args.npz) as cached:
            for name in names:
                setattr(manager, name, cached[name])
        print(f"Loaded the split from {args.npz}")
        return manager
    folder = args.animals_dir or os.environ.get("ANIMALS_DIR") or str(REPO_ROOT / "datasets" / "Animals")
    manager.load(models.create_label_folder_dict(folder), max_num_images=100 if args.quick else 500)
    manager.process_data_label()
    manager.train_valid_test_split()
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, **{name: getattr(manager, name) for name in names})
    return manager


class EpochTimer(keras.callbacks.Callback):
    """Seconds per epoch: the training pass alone and the whole epoch (validation and callbacks)."""

    def __init__(self):
        super().__init__()
        self.train, self.epoch = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._validation = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        if self._validation is None:
            self._validation = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        end = time.perf_counter()
        self.train.append((self._validation or end) - self._start)
        self.epoch.append(end - self._start)


def time_training(name, options, manager, epochs):
    """Trains 1 warm-up + ``epochs`` epochs; returns the median timings and the network."""
    net = models.YourModel(**BASE, **options)
    net.build_cnn()
    timer = EpochTimer()
    print(f"{name}: 1 warm-up + {epochs} timed epochs", flush=True)
    # extra callbacks run last: the timer sees RobustValidation's per-epoch PGD evaluation
    net.fit(manager, num_epochs=1 + epochs, callbacks=[timer])
    return dict(
        train_s=statistics.median(timer.train[1:]),
        epoch_s=statistics.median(timer.epoch[1:]),
        train_all_s=timer.train,
        epoch_all_s=timer.epoch,
        final_val_accuracy=net.history["val_accuracy"][-1],
    ), net


def time_call(function, repeats):
    function()  # warm-up: tracing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        np.asarray(result)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def time_pgd(model, x, y, repeats):
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    logits_fn = attacks.logits_model(model)
    ours_s, ours = time_call(lambda: attacks.pgd_attack(model, x, y, eps=EPS, k=20, eta=ETA), repeats)
    theirs_s, theirs = time_call(
        lambda: projected_gradient_descent(
            logits_fn,
            tf.constant(x),
            EPS,
            ETA,
            20,
            np.inf,
            clip_min=-1.0,
            clip_max=1.0,
            y=tf.constant(y),
            rand_init=False,
        ),
        repeats,
    )
    agree = float(np.mean(np.isclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=1e-6)))
    return dict(
        images=len(x), ours_s=ours_s, cleverhans_s=theirs_s, speedup=theirs_s / ours_s, pixels_agree=agree
    )


def markdown(result):
    m = result["machine"]
    lines = [
        f"Machine: {m['nproc']} CPU cores ({m['cpu']}), Python {m['python']}, TensorFlow {m['tensorflow']}, "
        f"Keras {m['keras']}; load average at start {m['load_average'][0]:.2f}. "
        f"{result['train_images']} training images, {result['timed_epochs']} timed epochs after 1 warm-up "
        f"(medians).",
        "",
        "| training | epoch (s) | x clean | training pass (s) | x clean | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    clean = result["training"]["clean"]
    for name, row in result["training"].items():
        target = f"<= {TARGETS[name]}x" if name in TARGETS else ""
        lines.append(
            f"| {name} | {row['epoch_s']:.2f} | {row['epoch_s'] / clean['epoch_s']:.2f} "
            f"| {row['train_s']:.2f} | {row['train_s'] / clean['train_s']:.2f} | {target} |"
        )
    if "pgd20" in result:
        p = result["pgd20"]
        lines += [
            "",
            "| PGD-20 on the test images | seconds | |",
            "|---|---:|---|",
            f"| ours (`attacks.pgd_attack`) | {p['ours_s']:.2f} | |",
            f"| cleverhans `projected_gradient_descent` | {p['cleverhans_s']:.2f} | |",
            f"| speed-up (cleverhans / ours) | {p['speedup']:.2f}x | target >= {PGD_TARGET}x |",
            "",
            f"{p['images']} images; {p['pixels_agree']:.2%} of pixels agree (atol 1e-6).",
        ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--epochs", type=int, default=3, help="timed epochs per configuration (after 1 warm-up)"
    )
    parser.add_argument("--quick", action="store_true", help="100 images per class (800 train, 100 test)")
    parser.add_argument("--npz", help="cache of the loaded split: read if it exists, else written")
    parser.add_argument("--animals-dir", help="default: $ANIMALS_DIR, else datasets/Animals")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3, help="timed PGD-20 calls (after 1 warm-up)")
    parser.add_argument("--no-pgd", action="store_true", help="skip the PGD-20 comparison")
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "benchmark.json"))
    args = parser.parse_args(argv)

    info = machine()
    if info["load_average"][0] > 0.5 * info["nproc"]:
        print(
            f"warning: load average {info['load_average'][0]:.2f} on {info['nproc']} cores: other jobs are "
            "running, the ratios are unreliable",
            flush=True,
        )
    configs = ["clean"] + [c for c in args.configs if c != "clean"]
    manager = load_data(args)
    result = dict(
        machine=info,
        quick=args.quick,
        timed_epochs=args.epochs,
        train_images=len(manager.X_train),
        training={},
    )
    clean_net = None
    for name in configs:
        result["training"][name], net = time_training(name, CONFIGS[name], manager, args.epochs)
        if name == "clean":
            clean_net = net
    if not args.no_pgd:
        print("PGD-20: ours vs cleverhans", flush=True)
        result["pgd20"] = time_pgd(clean_net.model, manager.X_test, manager.y_test, args.repeats)
    result["load_average_at_end"] = list(os.getloadavg())
    result["markdown"] = markdown(result)
    write_json(result, args.out)
    print(result["markdown"])
    print(f"\nWritten to {args.out}")
    return result


if __name__ == "__main__":
    main()
