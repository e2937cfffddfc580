"""The experiment cache: each trained network is saved once and reused until what made it changes.

An entry is two files: the network, ``<folder>/models/<name>.h5``, and its record,
``<folder>/results/cache/<name>.json`` (history, training time, epochs, and the key with its parts).
The key is a hash of four parts, each of which must match for the entry to be reused:

- ``config``: the network's configuration (``network.get_config()``) and the fit arguments;
- ``data``: a fingerprint of the training and validation arrays;
- ``code``: the *meaning* of the code that trains the network (``code_fingerprint``): the normalized
  syntax tree (no docstrings, comments or layout) of every function, class and module-level constant
  of the project that training reaches from the network's class, found by following names;
- ``versions``: the TensorFlow and Keras versions.

So a moved function, a reordered module, an edited docstring or a new comment keep every entry, while
a changed constant, operation or default marks it stale. Usage::

    cache = ExperimentCache(".", data_manager)
    run = cache.fit(network, "Part3_default", batch_size=64, num_epochs=20)   # trains or reuses

``python -m experiments check`` lists every entry of the project's cache as current or stale (and why).
"""

import argparse
import ast
import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import json
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

from storage import file_sha256, write_json

PROJECT_DIR = Path(__file__).resolve().parent
KEY_PARTS = ("config", "data", "code", "versions")


# --------------------------------------------------------------------------------------------------
# The key
# --------------------------------------------------------------------------------------------------
def _is_project(obj):
    """True for a function, class or module defined in a .py file of this folder (not a test)."""
    module = obj if isinstance(obj, types.ModuleType) else sys.modules.get(getattr(obj, "__module__", None))
    path = getattr(module, "__file__", None)
    return path is not None and Path(path).resolve().parent == PROJECT_DIR


def _without_docstrings(tree):
    """The tree with the docstring of every module, class and function removed."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


def canonical_dump(node):
    """A text of a syntax tree that is the same for the same source under every Python the project
    supports (3.11 to 3.13), where ``ast.dump`` is not: 3.12 adds ``type_params=[]`` to every function
    and class and an empty ``Constant('')`` to an f-string's nested format spec, and 3.13 leaves out
    empty fields. So a field that is absent, None or an empty list is left out, and the string pieces
    of an f-string are joined with the empty ones dropped. Positions (line, column) never count."""
    if isinstance(node, list):
        return "[" + ", ".join(canonical_dump(item) for item in node) + "]"
    if not isinstance(node, ast.AST):
        return repr(node)
    fields = []
    for name in node._fields:
        value = getattr(node, name, None)
        if isinstance(node, ast.JoinedStr) and name == "values":
            value = _joined_pieces(value)
        if value is None or (isinstance(value, list) and not value):
            continue
        fields.append(f"{name}={canonical_dump(value)}")
    return f"{type(node).__name__}({', '.join(fields)})"


def _joined_pieces(values):
    """An f-string's pieces with adjacent string constants joined and empty ones dropped."""
    pieces = []
    for value in values:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            if pieces and isinstance(pieces[-1], ast.Constant) and isinstance(pieces[-1].value, str):
                pieces[-1] = ast.Constant(pieces[-1].value + value.value)
            elif value.value:
                pieces.append(ast.Constant(value.value))
        else:
            pieces.append(value)
    return pieces


def module_text(path):
    """The canonical text (``canonical_dump``) of a module file's syntax tree, docstrings removed:
    what the key counts of that file. Needs only the standard library (the cross-version test runs
    it under every interpreter it finds)."""
    return canonical_dump(_without_docstrings(ast.parse(Path(path).read_text())))


_SOURCES = {}  # module name -> its source text, read once per process


def _module_source(module):
    """The source of ``module`` as it was when first asked for (so that an edit of the file during a
    long run cannot change the keys of the code that the running process has already imported)."""
    if module.__name__ not in _SOURCES:
        _SOURCES[module.__name__] = Path(module.__file__).read_text()
    return _SOURCES[module.__name__]


def _definition(obj):
    """The syntax tree of a project function or class, docstrings removed."""
    obj = inspect.unwrap(obj)
    module = sys.modules[obj.__module__]
    tree = ast.parse(_module_source(module))
    path = obj.__qualname__.split(".")
    for name in path:
        tree = next(
            node
            for node in ast.iter_child_nodes(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name
        )
    return _without_docstrings(tree)


def _names(tree):
    """Global names the tree reads, attribute chains on them (``attacks.pgd_attack``), and the
    attributes it reads of ``self``/``cls``/``super()`` (methods and class constants)."""
    globals_, members = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            globals_.add((node.id,))
        elif isinstance(node, ast.Attribute):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                members.add(chain[-1])
            elif isinstance(value, ast.Call) and getattr(value.func, "id", None) == "super":
                members.add(chain[-1])
            elif isinstance(value, ast.Name):
                globals_.add((value.id, *reversed(chain)))
    return globals_, members


def _value_text(value, reached):
    """A stable text for a module-level constant; project functions and classes inside it (e.g.
    a dict of them) are added to ``reached`` instead of being spelled out."""
    if isinstance(value, bool | int | float | complex | str | bytes | type(None)):
        return repr(value)
    if isinstance(value, list | tuple | set | frozenset):
        items = [_value_text(v, reached) for v in value]
        if isinstance(value, set | frozenset):
            items = sorted(items)
        return f"{type(value).__name__}({', '.join(items)})"
    if isinstance(value, dict):
        items = sorted(f"{_value_text(k, reached)}: {_value_text(v, reached)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if callable(value) or isinstance(value, type):
        if _is_project(value):
            reached.append(value)
            return f"<{value.__qualname__}>"
        return f"<{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}>"
    return f"<{type(value).__module__}.{type(value).__qualname__}>"  # e.g. a cache: its contents don't count


@functools.cache  # the sources are read once per process, so the fingerprint cannot change in it
def code_fingerprint(network_class):
    """sha256 of the meaning of the code that trains an instance of ``network_class``.

    Starting from the methods of ``network_class`` (and of its project base classes) that the cache
    calls (``__init__``, ``get_config``, ``build_cnn``, ``fit``, ``save``), it follows every name
    that this code reads: ``self.x`` to the methods and class constants of that name in the class
    hierarchy, a global name to the project function, class or module-level constant it denotes
    (a class is taken whole: Keras calls its methods by itself), ``module.name`` likewise. Each
    function or class counts as its syntax tree without docstrings, comments or layout, keyed by its
    qualified name (not its module, so moving it keeps the key); a constant counts as its value.
    """
    hierarchy = [c for c in network_class.__mro__ if _is_project(c)]
    parts, seen_members, queue = {}, set(), []

    def reach_member(name):
        if name in seen_members:
            return
        seen_members.add(name)
        for cls in hierarchy:
            if name in vars(cls):
                attribute = vars(cls)[name]
                if isinstance(attribute, staticmethod | classmethod):
                    attribute = attribute.__func__
                if inspect.isfunction(attribute):
                    queue.append(attribute)
                else:
                    parts[f"{cls.__qualname__}.{name}"] = _value_text(attribute, queue)

    for name in ("__init__", "get_config", "build_cnn", "fit", "save"):
        reach_member(name)
    reach_member("CONFIG_KEYS")
    while queue:
        obj = queue.pop()
        label = obj.__qualname__
        if label in parts:
            continue
        tree = _definition(obj)
        parts[label] = canonical_dump(tree)
        if inspect.isclass(obj):
            parts[label + " bases"] = ",".join(b.__qualname__ for b in obj.__mro__[1:])
            queue.extend(b for b in obj.__mro__[1:] if _is_project(b))
        namespace = vars(sys.modules[obj.__module__])
        globals_, members = _names(tree)
        for member in members:
            reach_member(member)
        for chain in sorted(globals_):
            if chain[0] not in namespace:
                continue  # a local variable, a parameter or a builtin
            value, label = namespace[chain[0]], chain[0]
            for attr in chain[1:]:
                if (
                    not isinstance(value, types.ModuleType)
                    or not _is_project(value)
                    or not hasattr(value, attr)
                ):
                    break
                value, label = getattr(value, attr), attr
            if isinstance(value, types.ModuleType):
                continue
            if inspect.isfunction(value) or inspect.isclass(value):
                if _is_project(value):
                    queue.append(value)
            elif not callable(value):
                parts[f"constant {label}"] = _value_text(value, queue)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def data_fingerprint(data_manager):
    """sha256 of the training and validation images and labels a model is trained on."""
    import numpy as np

    digest = hashlib.sha256()
    for array in (data_manager.X_train, data_manager.y_train, data_manager.X_valid, data_manager.y_valid):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def library_versions():
    import keras
    import tensorflow as tf

    return {"tensorflow": tf.__version__, "keras": keras.__version__}


def run_config(network, batch_size=None, num_epochs=None):
    """The ``config`` part of a key: the network's configuration and the fit arguments."""
    return dict(
        network.get_config(),
        fit_batch_size=batch_size or network.batch_size,
        fit_num_epochs=num_epochs or network.num_epochs,
    )


def key_parts(network, data_manager, batch_size=None, num_epochs=None):
    """The four parts of an experiment's key (see the module docstring)."""
    return {
        "config": run_config(network, batch_size, num_epochs),
        "data": data_fingerprint(data_manager),
        "code": code_fingerprint(type(network)),
        "versions": library_versions(),
    }


def key_of(parts):
    return hashlib.sha256(
        json.dumps([parts[p] for p in KEY_PARTS], sort_keys=True, default=str).encode()
    ).hexdigest()


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """A trained network's record: where it is saved, its per-epoch history, the training time
    (seconds, as measured when it was trained), epochs run, the kept epoch (1-based, or None),
    whether it was loaded from the cache rather than trained by this call (always True for the
    runs that ``ExperimentCache.entries`` lists) and what training printed (Keras's per-epoch log;
    None for entries trained before logs were kept)."""

    name: str
    model_path: Path
    history: dict
    seconds: float
    epochs_run: int
    best_epoch: int | None
    reused: bool
    log: str | None = None

    @property
    def seconds_per_epoch(self):
        return self.seconds / self.epochs_run


class ExperimentCache:
    """Trains networks once and reuses them: see the module docstring.

    ``folder``: the project (or an output) folder, holding ``models/`` and ``results/cache/``;
    ``data_manager``: the data every network of this cache trains on (``X_train``, ``y_train``,
    ``X_valid``, ``y_valid``); ``force``: retrain even a current entry; ``quiet``: say nothing when
    an entry is reused (``reused`` lists them, for one summary line).
    """

    def __init__(self, folder, data_manager, force=False, quiet=False):
        self.folder = Path(folder)
        self.data_manager = data_manager
        self.force = force
        self.quiet = quiet
        self.reused, self.trained = [], []

    def model_path(self, name):
        return self.folder / "models" / f"{name}.h5"

    def record_path(self, name):
        return self.folder / "results" / "cache" / f"{name}.json"

    def fit(self, network, name, batch_size=None, num_epochs=None, callbacks=()):
        """Builds and trains ``network`` (``build_cnn`` then ``fit``) and saves it as entry ``name``,
        or, when the entry is current, loads the saved network and its history into it instead.
        Prints one line saying which. Returns the entry's ``Run``. ``callbacks`` are passed to
        ``network.fit`` and are not part of the key: they must only watch (progress, timing). A current
        entry whose model file is missing is a FileNotFoundError naming the file (unless ``force``), not a
        silent retraining."""
        parts = key_parts(network, self.data_manager, batch_size, num_epochs)
        key = key_of(parts)
        record = self._record(name)
        if self.force:
            print(f"Training {name} (force=True).")
        elif record and record.get("key") == key:
            if not self.model_path(name).exists():
                raise FileNotFoundError(
                    f"{name}: the cache entry {self.record_path(name)} is current but its model "
                    f"{self.model_path(name)} is missing; put the model file back (e.g. from the project's "
                    "models/ folder) or retrain with force=True (FORCE_RETRAIN = True in the notebook)."
                )
            network.load(self.model_path(name))
            network.history, network.best_epoch = record["history"], record["best_epoch"]
            run = self._run(name, record, reused=True)
            self.reused.append(name)
            if not self.quiet:
                seconds = f"{run.seconds:.0f} s"
                print(f"Reused {name}: {run.epochs_run} epochs, trained in {seconds} ({run.model_path}).")
            return run
        elif record:
            reasons = stale_reasons(record, parts) or ["key"]
            print(f"Retraining {name}: its {', '.join(reasons)} changed.")
        network.build_cnn()
        log = _Tee(sys.stdout)
        started = time.perf_counter()
        with contextlib.redirect_stdout(log):
            network.fit(self.data_manager, batch_size=batch_size, num_epochs=num_epochs, callbacks=callbacks)
        seconds = time.perf_counter() - started
        network.save(self.model_path(name))
        record = dict(
            key=key,
            key_parts=parts,
            history=network.history,
            seconds=seconds,
            epochs_run=len(network.history["loss"]),
            best_epoch=network.best_epoch,
            log=log.getvalue(),
        )
        write_json(record, self.record_path(name))
        self.trained.append(name)
        return self._run(name, record, reused=False)

    def entries(self):
        """Every entry of this cache: {name: Run}, names sorted (``grid/...`` for sub-folders)."""
        folder = self.folder / "results" / "cache"
        names = sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.json"))
        return {name: self._run(name, self._record(name), reused=True) for name in names}

    def _record(self, name):
        path = self.record_path(name)
        return json.loads(path.read_text()) if path.exists() else None

    def _run(self, name, record, reused):
        return Run(
            name=name,
            model_path=self.model_path(name),
            history=record["history"],
            seconds=record["seconds"],
            epochs_run=record["epochs_run"],
            best_epoch=record["best_epoch"],
            reused=reused,
            log=record.get("log"),
        )

    def check(self, network_class_of=None):
        """(name, stale reasons) for every entry: an empty list when the entry is current.
        ``network_class_of(config)`` gives the class that trains a recorded configuration
        (default: the class of that name in ``models``)."""
        if network_class_of is None:
            models = importlib.import_module("models")

            def network_class_of(config):
                return getattr(models, config["class"])

        data, versions, report = data_fingerprint(self.data_manager), library_versions(), []
        for name in self.entries():
            record = self._record(name)
            if "key_parts" not in record:
                report.append((name, ["key scheme (not migrated)"]))
                continue
            config = record["key_parts"]["config"]
            cls = network_class_of(config)
            network = self.recorded_network(cls, config)
            parts = dict(
                config=run_config(network, config["fit_batch_size"], config["fit_num_epochs"]),
                data=data,
                code=code_fingerprint(cls),
                versions=versions,
            )
            reasons = stale_reasons(record, parts)
            if not reasons and record["key"] != key_of(parts):
                reasons = ["key"]
            if not self.model_path(name).exists():
                reasons.append("model file missing")
            report.append((name, reasons))
        return report

    def recorded_network(self, cls, config):
        """An unbuilt ``cls`` network with a recorded configuration (``run_config``'s); one trained from
        saved weights starts from the model file of this cache with the recorded sha256 (None if gone)."""
        network = network_of(cls, config)
        if "init_from_sha256" in config:
            network.init_from = self._model_with_sha256(config["init_from_sha256"])
        return network

    def _model_with_sha256(self, digest):
        """The path of a model file of this cache whose content has sha256 ``digest``, or None."""
        for path in sorted((self.folder / "models").rglob("*.h5")):
            if file_sha256(path) == digest:
                return str(path)
        return None


class _Tee(io.StringIO):
    """A text stream that keeps what is written to it and passes it on to ``stream``."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text):
        self.stream.write(text)
        return super().write(text)

    def flush(self):
        self.stream.flush()


def network_of(cls, config):
    """An (unbuilt) ``cls`` network with the recorded configuration ``config`` (``run_config``'s)."""
    return cls(**{key: value for key, value in config.items() if key in cls.CONFIG_KEYS})


def stale_reasons(record, parts):
    """Which parts of a recorded key differ from ``parts`` (all of them for an old-style record)."""
    recorded = record.get("key_parts")
    if recorded is None:
        return ["key scheme"]
    return [
        part
        for part in KEY_PARTS
        if json.dumps(recorded[part], sort_keys=True, default=str)
        != json.dumps(parts[part], sort_keys=True, default=str)
    ]


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
def animals_data(folder=None, max_num_images=500):
    """The Animals data as the Part 3 notebook loads it in the full profile (32x32, seeded split)."""
    import os

    from models import AnimalsDatasetManager, SimplePreprocessor, create_label_folder_dict

    folder = folder or os.environ.get("ANIMALS_DIR", str(PROJECT_DIR / "datasets" / "Animals"))
    data = AnimalsDatasetManager([SimplePreprocessor(width=32, height=32)])
    data.load(create_label_folder_dict(folder), max_num_images=max_num_images)
    data.process_data_label()
    data.train_valid_test_split()
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check", help="say for every cache entry whether it is current or stale, and why"
    )
    check.add_argument("--folder", default=str(PROJECT_DIR), help="folder holding models/ and results/cache/")
    check.add_argument(
        "--animals", default=None, help="the Animals folder (default: $ANIMALS_DIR or datasets/Animals)"
    )
    check.add_argument(
        "--max-images", type=int, default=500, help="images per class, as the notebook's profile"
    )
    args = parser.parse_args(argv)

    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the data manager prints per-class counts
        data = animals_data(args.animals, args.max_images)
    report = ExperimentCache(args.folder, data).check()
    for name, reasons in report:
        print(f"{name}: {'current' if not reasons else 'stale (' + ', '.join(reasons) + ' changed)'}")
    stale = sum(1 for _, reasons in report if reasons)
    print(f"{len(report)} entries, all current" if not stale else f"{len(report)} entries, {stale} stale")
    return 0 if report and not stale else 1


if __name__ == "__main__":
    sys.exit(main())
