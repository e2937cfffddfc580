"""Seconds per epoch of plain training, SAM and SAM on a random half of the steps, interleaved (run by hand).

Question 3.10's idea (SAM's step on a random fraction of the steps, a plain step on the others) is about
compute, so its cost must be measured fairly: this machine's speed drifts by up to 1.5x within minutes, so
seconds per epoch of runs trained at different times cannot be compared. Here the three contenders train in
one process, one epoch each in turn: a warm-up round (tracing), then ``--rounds`` timed rounds, the order
rotated every round so that no contender always goes first. Each contender is a YourModel of the SAM
study's configuration (the 3.7 configuration: the 3.4 architecture, cosine schedule with a 2-epoch warm-up,
batch 64, crop-and-flip augmentation, mixup alpha 0.2, no early stopping), compiled and fed as
``DefaultModel.fit`` does it (the same trainer, optimizer, loss, metric and dataset), and trained one epoch
per ``fit`` call on that one compiled trainer, so that its training function is traced once and its
optimizer state carries on. An epoch is timed from its start to the end of its validation, as the training
runs record it. Reported: the median of each contender's timed epochs, their range, and the median's ratio
to plain training's median, the cost the study's compute budgets use. (Threads taking turns inside one
``fit`` each were tried first: the waiting contenders' input pipelines kept working beside the timed epoch,
and two of four rounds came out 3-5 times slower.)

    .venv/bin/python benchmarks/bench_sam_variant.py                   # 1 warm-up + 6 timed rounds
    .venv/bin/python benchmarks/bench_sam_variant.py --rounds 2 --quick   # smoke run: 100 images per class

Prints a Markdown table and writes ``runs/bench_sam_variant.json`` (``--out``).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from bench_training import BASE, REPO_ROOT, load_data, machine  # noqa: E402

import models  # noqa: E402
from storage import write_json  # noqa: E402

CONFIGURATION = dict(  # the SAM study's: bench_training's network without skip connections, as 3.4 chose it
    BASE,
    use_skip=False,
    is_augmentation=True,
    augmenter="crop_flip",
    schedule=models.CosineSchedule(warmup_epochs=2),
    mixup=models.Mixup(alpha=0.2),
    early_stopping=None,
)
CONTENDERS = {
    "plain": dict(sam=None),
    "SAM": dict(sam=models.SAM(rho=0.05)),
    "SAM on half the steps": dict(sam=models.SAM(rho=0.05, fraction=0.5)),
}


def contender(name, manager, epochs):
    """A function that trains contender ``name`` for one more epoch and returns its seconds; its network
    is compiled once for a run of ``epochs`` epochs (the schedule's length), as ``DefaultModel.fit`` does."""
    network = models.YourModel(name=name.replace(" ", "_"), **CONFIGURATION, **CONTENDERS[name])
    network.build_cnn()
    keras.utils.set_random_seed(network.seed)
    batch_size = network.batch_size
    trainer = network._trainer()
    trainer.compile(
        optimizer=network._make_optimizer(int(np.ceil(len(manager.X_train) / batch_size)), epochs),
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    dataset = network._train_dataset(manager.X_train, manager.y_train, batch_size)
    onehot = keras.utils.to_categorical(manager.y_valid, network.num_classes).astype(np.float32)
    callbacks = network._callbacks(manager, epochs)

    def one_epoch():
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.fit(
            dataset,
            validation_data=(manager.X_valid, onehot),
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
        return time.perf_counter() - start, time.process_time() - cpu_start

    return one_epoch


def interleaved(manager, rounds):
    """({name: [wall-clock seconds of each epoch]}, {name: [CPU seconds of each epoch]}) of 1 + ``rounds``
    epochs per contender, one epoch of each in turn, the order rotated every round. The CPU seconds (the
    process's, all threads) are the compute an epoch takes whatever else the machine does: a shared or
    throttled machine stretches the wall clock, not them."""
    names = list(CONTENDERS)
    epochs = {name: contender(name, manager, 1 + rounds) for name in names}
    seconds, cpu_seconds = {name: [] for name in names}, {name: [] for name in names}
    for r in range(1 + rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            wall, cpu = epochs[name]()
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)
            print(
                f"round {r}{' (warm-up)' if r == 0 else ''}: {name} {wall:.2f} s, CPU {cpu:.2f} s", flush=True
            )
    return seconds, cpu_seconds


def summary(seconds, cpu_seconds):
    """Per contender: the median and range of its timed epochs (the warm-up left out) and the ratio of its
    median to plain training's, in wall-clock and in CPU seconds."""
    median = {name: statistics.median(times[1:]) for name, times in seconds.items()}
    cpu_median = {name: statistics.median(times[1:]) for name, times in cpu_seconds.items()}
    return {
        name: dict(
            median_s=median[name],
            min_s=min(times[1:]),
            max_s=max(times[1:]),
            ratio_to_plain=median[name] / median["plain"],
            epochs_s=times,
            cpu_median_s=cpu_median[name],
            cpu_ratio_to_plain=cpu_median[name] / cpu_median["plain"],
            epochs_cpu_s=cpu_seconds[name],
        )
        for name, times in seconds.items()
    }


def markdown(result):
    m = result["machine"]
    lines = [
        f"{m['nproc']} CPU cores ({m['cpu']}), TensorFlow {m['tensorflow']}, Keras {m['keras']}; "
        f"load average {m['load_average'][0]:.2f} at the start, {result['load_average_at_end'][0]:.2f} "
        f"at the end. {result['train_images']} training images; 1 warm-up and {result['rounds']} timed "
        "rounds, one epoch of each contender in turn (medians).",
        "",
        "| training (3.7 configuration) | epoch, median (s) | range (s) | x plain | CPU (s) | x plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["contenders"].items():
        lines.append(
            f"| {name} | {row['median_s']:.2f} | {row['min_s']:.2f}-{row['max_s']:.2f} | "
            f"{row['ratio_to_plain']:.2f} | {row['cpu_median_s']:.2f} | {row['cpu_ratio_to_plain']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (after 1 warm-up round), >= 2")
    parser.add_argument("--quick", action="store_true", help="100 images per class (800 train)")
    parser.add_argument("--npz", help="cache of the loaded split: read if it exists, else written")
    parser.add_argument("--animals-dir", help="default: $ANIMALS_DIR, else datasets/Animals")
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "bench_sam_variant.json"))
    args = parser.parse_args(argv)
    if args.rounds < 2:  # the schedule's 2-epoch warm-up needs a run of 3 epochs or more
        parser.error(f"--rounds must be >= 2, got {args.rounds}")
    info = machine()
    if info["load_average"][0] > 0.5 * info["nproc"]:
        print(f"warning: load average {info['load_average'][0]:.2f}: other jobs are running", flush=True)
    manager = load_data(args)
    seconds, cpu_seconds = interleaved(manager, args.rounds)
    result = dict(
        machine=info,
        quick=args.quick,
        rounds=args.rounds,
        train_images=len(manager.X_train),
        contenders=summary(seconds, cpu_seconds),
        load_average_at_end=list(os.getloadavg()),
    )
    result["markdown"] = markdown(result)
    write_json(result, args.out)
    print(result["markdown"])
    print(f"\nWritten to {args.out}")
    return result


if __name__ == "__main__":
    main()
