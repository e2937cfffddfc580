"""Seconds per epoch of plain training, SAM and SAM on a random half of the steps, interleaved (run by hand).

Question 3.10's idea (SAM's step on a random fraction of the steps, a plain step on the others) is about
compute, so its cost must be measured fairly: this machine's speed drifts by up to 1.5x within minutes, so
seconds per epoch of runs trained at different times cannot be compared. Here the three contenders train in
one process, one epoch each in turn: a warm-up round (tracing), then ``--rounds`` timed rounds, the order
rotated every round so that no contender always goes first. Each contender is the notebook's own
``YourModel.fit`` (the 3.7 configuration of the SAM study: the 3.4 architecture, cosine schedule with a
2-epoch warm-up, batch 64, crop-and-flip augmentation, mixup alpha 0.2, no early stopping), in its own
thread; a callback lets exactly one epoch run at a time. An epoch is timed from its start to the end of its
validation, as the training runs record it. Reported: the median of each contender's timed epochs, its
spread (min-max), and its ratio to plain training's median, the cost the study's compute budgets use.

    .venv/bin/python benchmarks/bench_sam_variant.py                   # 1 warm-up + 4 timed rounds
    .venv/bin/python benchmarks/bench_sam_variant.py --rounds 2 --quick   # smoke run: 100 images per class

Prints a Markdown table and writes ``runs/bench_sam_variant.json`` (``--out``).
"""

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
from bench_training import REPO_ROOT, load_data, machine  # noqa: E402

import models  # noqa: E402
from storage import write_json  # noqa: E402

CONFIGURATION = dict(
    num_blocks=3,
    feature_maps=32,
    num_classes=10,
    batch_norm=True,
    use_skip=False,
    drop_rate=0.2,
    optimizer="adam",
    learning_rate=1e-3,
    batch_size=64,
    verbose=False,
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


class Turns:
    """Lets the contenders' epochs run one at a time, in the order of ``order`` (a list of names)."""

    def __init__(self, order, timeout=1800):
        self.order, self.next, self.timeout = order, 0, timeout
        self.condition = threading.Condition()
        self.failed = None

    def wait_for(self, name):
        with self.condition:
            if not self.condition.wait_for(
                lambda: self.failed or self.order[self.next] == name, timeout=self.timeout
            ):
                raise TimeoutError(f"{name} waited {self.timeout} s for its turn")
            if self.failed:
                raise RuntimeError(f"{name} stopped: {self.failed}")

    def done(self):
        with self.condition:
            self.next += 1
            self.condition.notify_all()

    def fail(self, reason):
        with self.condition:
            self.failed = reason
            self.condition.notify_all()


class TakeTurns(keras.callbacks.Callback):
    """Waits for the contender's turn before each epoch and times the epoch (training and validation)."""

    def __init__(self, name, turns):
        super().__init__()
        self.name, self.turns, self.seconds = name, turns, []

    def on_epoch_begin(self, epoch, logs=None):
        self.turns.wait_for(self.name)
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)
        self.turns.done()


def interleaved(manager, rounds):
    """{name: [seconds of each epoch]} of 1 + ``rounds`` epochs per contender, taken in turn."""
    names = list(CONTENDERS)
    order = [names[(i + r) % len(names)] for r in range(1 + rounds) for i in range(len(names))]
    turns = Turns(order)
    timers = {name: TakeTurns(name, turns) for name in names}

    def train(name):
        try:
            network = models.YourModel(name=name.replace(" ", "_"), **CONFIGURATION, **CONTENDERS[name])
            network.build_cnn()
            network.fit(manager, num_epochs=1 + rounds, callbacks=[timers[name]])
        except BaseException as error:  # the others must not wait for a turn that never comes
            turns.fail(f"{name}: {error!r}")
            raise

    threads = [threading.Thread(target=train, args=(name,), name=name) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if turns.failed:
        raise RuntimeError(turns.failed)
    return {name: timer.seconds for name, timer in timers.items()}


def summary(seconds):
    """Per contender: the median and range of its timed epochs (the warm-up left out) and the ratio of its
    median to plain training's."""
    plain = statistics.median(seconds["plain"][1:])
    return {
        name: dict(
            median_s=statistics.median(times[1:]),
            min_s=min(times[1:]),
            max_s=max(times[1:]),
            ratio_to_plain=statistics.median(times[1:]) / plain,
            epochs_s=times,
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
        "| training (3.7 configuration) | epoch, median (s) | range (s) | x plain |",
        "|---|---:|---:|---:|",
    ]
    for name, row in result["contenders"].items():
        lines.append(
            f"| {name} | {row['median_s']:.2f} | {row['min_s']:.2f}-{row['max_s']:.2f} | "
            f"{row['ratio_to_plain']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds (after 1 warm-up round), >= 2")
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
    seconds = interleaved(manager, args.rounds)
    result = dict(
        machine=info,
        quick=args.quick,
        rounds=args.rounds,
        train_images=len(manager.X_train),
        contenders=summary(seconds),
        load_average_at_end=list(os.getloadavg()),
    )
    result["markdown"] = markdown(result)
    write_json(result, args.out)
    print(result["markdown"])
    print(f"\nWritten to {args.out}")
    return result


if __name__ == "__main__":
    main()
