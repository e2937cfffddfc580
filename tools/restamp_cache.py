"""Keeps the experiment cache across a change of the library that does not change what training
produces (a refactoring, or a new option that is off unless asked for): proves that, then re-stamps
every entry with the key of the new code. No model is retrained and no ``.h5`` file is touched.

The proof has three steps; the records are rewritten only when all three pass.

1. Every entry was current under the old code: ``python -m experiments check`` runs in a git worktree
   of ``--since`` (the commit whose code trained the entries) against this folder's cache.
2. The old and the new code train the same networks, bit for bit: the short trainings of ``PROBES``
   (every training path the entries use: the course's ``DefaultModel``; augmentation with early
   stopping and the warm-up cosine schedule; mixup with weight decay and label smoothing; PGD
   adversarial training from saved weights with the checkpoint rule; SAM) run once with each code,
   each code in a fresh process, on the same small synthetic data; the sha256 of every trained
   network's weights and of its history must be equal. Each code makes each probe from the same recorded
   configuration with its own ``ExperimentCache.recorded_network``, as it reads a cache entry, so the
   probes also prove that the new code reads a record as the old code did.
3. Each entry's configuration read by the new code says what the recorded one says: the same values
   (a configuration recorded before issue 30, whose options were flat keywords, compared in those
   keywords: ``flat_config``), plus options that the new code adds, which must hold the value its
   constructor defaults to (the option is off).

    python tools/restamp_cache.py --since b1a6b4c [--folder .] [--animals datasets/Animals]
"""

import argparse
import contextlib
import hashlib
import inspect
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")  # the child processes: no TensorFlow start-up noise

# name -> (class, recorded configuration, fit epochs): a configuration as the records before issue 30 hold
# it (YourModel's options as flat keywords, which every code since reads: experiments.from_flat), so that
# the code of any commit since 8436b95 can make the probe; "init_from": "<probe>" starts from that probe's
# trained weights (recorded by their sha256). Small networks and data: the point is the code path, not the
# accuracy. The probes switch on every option the committed entries use (a test checks it), and only
# options the old code knows: weight averaging (ema_momentum) joined them after it served to re-stamp the
# cache since b1a6b4c, SAM on a fraction of the steps (the "sam_fraction" probe) after it served since
# ae0729d.
SMALL = dict(num_blocks=2, feature_maps=8, num_classes=4, batch_size=16)
CNN = dict(SMALL, batch_norm=True, is_augmentation=True, lr_schedule="cosine", learning_rate=1e-3)
PROBES = {
    "default": ("DefaultModel", SMALL, 2),
    "augment": ("YourModel", dict(CNN, patience=1, patience_from=1, warmup_epochs=1, ema_momentum=0.9), 4),
    "mixup": (
        "YourModel",
        dict(CNN, use_skip=False, patience=3, mixup_alpha=0.2, weight_decay=0.004, label_smoothing=0.1),
        3,
    ),
    "robust": (
        "YourModel",
        dict(
            CNN,
            patience=3,
            mixup_alpha=0.2,
            adv_eps=0.0313,
            adv_k=2,
            adv_val_k=3,
            robust_tolerance=0.01,
            warmup_epochs=1,
            init_from="mixup",
            ema_momentum=0.9,
        ),
        3,
    ),
    "sam": ("YourModel", dict(CNN, patience=3, sam_rho=0.05), 2),
    "sam_fraction": ("YourModel", dict(CNN, patience=3, sam_rho=0.05, sam_fraction=0.5), 2),
}


def run_probes(out):
    """Trains every probe with the ``models`` and ``experiments`` modules on ``sys.path`` (the code under
    test), each made by that code's ``ExperimentCache.recorded_network`` from its recorded configuration,
    and writes {probe: {"weights": sha256, "history": sha256}} to ``out``."""
    import numpy as np

    import experiments
    import models

    rng = np.random.RandomState(0)
    data = models.AnimalsDatasetManager()
    data.X_train = rng.uniform(-1, 1, (64, 32, 32, 3)).astype(np.float32)
    data.y_train = rng.randint(0, 4, 64)
    data.X_valid = rng.uniform(-1, 1, (32, 32, 32, 3)).astype(np.float32)
    data.y_valid = rng.randint(0, 4, 32)
    cache, digests = experiments.ExperimentCache(tempfile.mkdtemp(), data), {}
    for name, (cls, options, epochs) in PROBES.items():
        config = dict(options, **{"class": cls})
        if "init_from" in config:
            start = cache.model_path(config.pop("init_from")).read_bytes()
            config["init_from_sha256"] = hashlib.sha256(start).hexdigest()
        network = cache.recorded_network(getattr(models, cls), config)
        network.verbose = False
        network.build_cnn()
        with contextlib.redirect_stdout(io.StringIO()):
            network.fit(data, num_epochs=epochs)
        network.save(str(cache.model_path(name)))
        arrays = network.model.get_weights()
        weights = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in arrays))
        history = hashlib.sha256(json.dumps(network.history, sort_keys=True).encode())
        digests[name] = {"weights": weights.hexdigest(), "history": history.hexdigest()}
    Path(out).write_text(json.dumps(digests, indent=1))


def probe_digests(code_dir):
    """``run_probes`` in a fresh process with ``code_dir``'s modules; returns its digests."""
    out = Path(tempfile.mkdtemp()) / "digests.json"
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--probe", str(out), "--code", str(code_dir)],
        check=True,
        cwd=code_dir,
        env=QUIET,
    )
    return json.loads(out.read_text())


@contextlib.contextmanager
def worktree(commit):
    """A temporary git worktree of ``commit`` (the old code)."""
    path = Path(tempfile.mkdtemp()) / f"code_{commit}"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT, check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=True)


def flat_config(config):
    """A configuration as ``YourModel.get_config`` records it since issue 30, in the flat keywords of the
    records before it (``experiments.FLAT_OPTIONS``): the inverse of ``experiments.from_flat``. An option
    that is off gives each of its keys the value that meant off, but for initial weights, whose key the old
    records hold only when they start from saved weights; the old schedule key holds "cosine", the one
    schedule there was."""
    import experiments

    flat = {key: value for key, value in config.items() if key not in experiments.FLAT_OPTIONS}
    for keyword, keys in experiments.FLAT_OPTIONS.items():
        fields = config.get(keyword)
        for key, (field, off) in keys.items():
            if fields is not None:
                flat[key] = fields[field] if field else "cosine"
            elif key != "init_from_sha256":
                flat[key] = off
    return flat


def config_problems(cls, recorded, config):
    """What the configuration the new code reads (``config``) says otherwise than the ``recorded`` one: a
    recorded value read as another, or an option that the new code adds not at its constructor's default."""
    import experiments

    said = config if experiments.from_flat(recorded) is recorded else flat_config(config)
    defaults = inspect.signature(cls.__init__).parameters
    problems = [
        f"{k} reads as {said.get(k)!r}, recorded {v!r}" for k, v in recorded.items() if said.get(k) != v
    ]
    problems += [
        f"new option {k}={v!r} is not its default"
        for k, v in said.items()
        if k not in recorded and (k not in defaults or defaults[k].default != v)
    ]
    return problems


def restamp(folder, animals, since):
    """Step 3 and the rewrite (see the module docstring); returns the number of entries refused."""
    import experiments
    import models
    from storage import write_json

    with contextlib.redirect_stdout(io.StringIO()):
        data = experiments.animals_data(animals)
    cache = experiments.ExperimentCache(folder, data)
    refused = 0
    for name in cache.entries():
        path = cache.record_path(name)
        record = json.loads(path.read_text())
        old = record["key_parts"]
        cls = getattr(models, old["config"]["class"])
        network = cache.recorded_network(cls, old["config"])
        parts = experiments.key_parts(
            network, data, old["config"]["fit_batch_size"], old["config"]["fit_num_epochs"]
        )
        problems = config_problems(cls, old["config"], parts["config"])
        problems += [f"its {p} differs" for p in ("data", "versions") if parts[p] != old[p]]
        if problems:
            print(f"{name}: refused ({'; '.join(problems)})")
            refused += 1
            continue
        migrations = record.get("restamped", []) + [{"since": since, "key": record["key"]}]
        write_json(dict(record, key=experiments.key_of(parts), key_parts=parts, restamped=migrations), path)
        on = [keyword for keyword in getattr(cls, "OPTIONS", {}) if parts["config"][keyword] is not None]
        print(f"{name}: re-stamped" + (f" (options on: {', '.join(on)})" if on else ""))
    return refused


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--since", help="the commit whose code trained the cache's entries")
    parser.add_argument("--folder", default=str(ROOT), help="folder holding models/ and results/cache/")
    parser.add_argument(
        "--animals", default=None, help="the Animals folder (default: $ANIMALS_DIR or datasets/Animals)"
    )
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: run_probes into this file
    parser.add_argument("--code", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        sys.path.insert(0, args.code)
        run_probes(args.probe)
        return 0
    if not args.since:
        parser.error("--since is required")
    sys.path.insert(0, str(ROOT))
    animals = str(Path(args.animals or ROOT / "datasets" / "Animals").resolve())
    folder = str(Path(args.folder).resolve())

    with worktree(args.since) as old_code:
        print(f"1. Are the entries current under {args.since}'s code?")
        check = subprocess.run(
            [sys.executable, "-m", "experiments", "check", "--folder", folder, "--animals", animals],
            cwd=old_code,
            env=QUIET,
            capture_output=True,
            text=True,
        )
        totals = [
            line
            for line in check.stdout.splitlines()
            if line.split(" ")[1:2] in (["entries,"], ["evaluations,"])
        ]
        print("\n".join(totals) if totals else check.stderr[-2000:])
        if check.returncode != 0:
            print(check.stdout)
            return 1
        print(f"2. Do {args.since}'s code and this code train the probes identically?")
        old, new = probe_digests(old_code), probe_digests(ROOT)
    for name in PROBES:
        same = old[name] == new[name]
        print(f"   {name}: {'identical' if same else 'DIFFERENT'} (weights {new[name]['weights'][:12]})")
    if old != new:
        print("The new code trains differently: the entries must be retrained, not re-stamped.")
        return 1
    print("3. Re-stamping each entry:")
    refused = restamp(folder, animals, args.since)
    print(f"{refused} entries refused" if refused else "every entry re-stamped")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
