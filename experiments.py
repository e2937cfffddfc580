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
import base64
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import importlib
import inspect
import io
import json
import os
import subprocess
import sys
import time
import types
import weakref
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


def _code_parts(hierarchy=(), members=(), roots=()):
    """{label: text} of the code reached from ``members`` (names looked up in the classes of
    ``hierarchy``, e.g. "fit") and from ``roots`` (project functions or classes), following every name
    the code reads (see ``code_fingerprint``)."""
    parts, seen_members, queue = {}, set(), list(roots)

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

    for name in members:
        reach_member(name)
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
        globals_, members_read = _names(tree)
        for member in members_read:
            reach_member(member)
        for chain in sorted(globals_):
            if chain[0] not in namespace or chain[0].startswith("__"):
                continue  # a local, a parameter, a builtin, or where the module lives (__file__, __name__)
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
    return parts


def _digest(parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


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
    members = ("__init__", "get_config", "build_cnn", "fit", "save", "CONFIG_KEYS")
    return _digest(_code_parts(hierarchy, members))


@functools.cache
def function_fingerprint(function):
    """sha256 of the meaning of a project function (or class) and of every project function, class and
    constant it reaches, by the rules of ``code_fingerprint``: what an evaluation's key counts of its code."""
    return _digest(_code_parts(roots=[function]))


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
    runs that ``ExperimentCache.entries`` lists), what training printed (Keras's per-epoch log; None for
    entries trained before logs were kept), the recorded configuration (``run_config``'s: the options it
    was trained with) and when and from which commit it was trained (``provenance``; None where unknown)."""

    name: str
    model_path: Path
    history: dict
    seconds: float
    epochs_run: int
    best_epoch: int | None
    reused: bool
    log: str | None = None
    config: dict | None = None
    computed_at: str | None = None
    commit: str | None = None

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
                    'models/ folder) or retrain with force=True (FRESH = "all" in the notebook).'
                )
            problem = model_file_problem(self.model_path(name), record)
            if problem:
                raise ValueError(
                    f"{name}: {problem}; restore the committed file (git checkout -- "
                    f'{self.model_path(name)}) or retrain with force=True (FRESH = "all" in the notebook).'
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
            model_sha256=file_sha256(self.model_path(name)),
            **provenance(),
        )
        write_json(record, self.record_path(name))
        self.trained.append(name)
        return self._run(name, record, reused=False)

    def entries(self):
        """Every entry of this cache: {name: Run}, names sorted (``grid/...`` for sub-folders)."""
        folder = self.folder / "results" / "cache"
        names = sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.json"))
        return {name: self.entry(name) for name in names}

    def entry(self, name):
        """The Run of the entry ``name``, read from its record (nothing is trained); KeyError without one."""
        record = self._record(name)
        if record is None:
            raise KeyError(f"no cache entry {name!r} in {self.folder / 'results' / 'cache'}")
        return self._run(name, record, reused=True)

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
            config=record.get("key_parts", {}).get("config"),
            computed_at=record.get("computed_at"),
            commit=record.get("commit"),
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
            problem = model_file_problem(self.model_path(name), record)
            if problem:
                reasons.append(problem)
            report.append((name, reasons))
        return report

    def recorded_network(self, cls, config):
        """An unbuilt ``cls`` network with a recorded configuration (``run_config``'s, of either scheme: see
        ``network_of``); one trained from saved weights starts from the model file of this cache with the
        recorded sha256 (its initial weights are off if there is none)."""
        return network_of(cls, config, self._model_with_sha256)

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


def model_file_problem(path, record):
    """None when the model file of a cache entry is there and holds what the entry recorded (its sha256),
    else what is wrong with it, in a few words: "model file missing" or "model file changed (...)"."""
    if not Path(path).exists():
        return "model file missing"
    recorded = record.get("model_sha256")
    if recorded is None:
        return "model file not recorded (no sha256 in the entry)"
    if file_sha256(path) != recorded:
        return f"model file changed ({path} is not the file the entry recorded: damaged or replaced)"
    return None


def provenance():
    """When and from which commit a result is computed: {"computed_at": UTC time, "commit": the short
    hash of HEAD, "+changes" when tracked files differ from it; None outside a git checkout}."""
    return {
        "computed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _head_commit(),
    }


@functools.cache
def _head_commit():
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if changed else "")


# YourModel's options as the configurations recorded before issue 30 name them: flat keywords, each now a
# field of an option object (keyword -> {flat key: (field, its value when the option is off)}). An option is
# on where its first key is (not None, 0 or absent); a key without a field only switches it on.
FLAT_OPTIONS = {
    "early_stopping": {"patience": ("patience", None), "patience_from": ("start_from_epoch", 0)},
    "schedule": {"lr_schedule": (None, None), "warmup_epochs": ("warmup_epochs", 0)},
    "weight_decay": {"weight_decay": ("rate", 0.0)},
    "weight_averaging": {"ema_momentum": ("momentum", 0.0)},
    "label_smoothing": {"label_smoothing": ("alpha", 0.0)},
    "mixup": {"mixup_alpha": ("alpha", 0.0)},
    "adversarial": {
        "adv_eps": ("eps", 0.0),
        "adv_k": ("steps", 10),
        "adv_eta": ("step_size", 0.002),
        "adv_val_k": ("validation_steps", 20),
        "robust_tolerance": ("tolerance", 0.0),
    },
    "sam": {"sam_rho": ("rho", 0.0), "sam_fraction": ("fraction", 1.0)},
    "initial_weights": {"init_from_sha256": ("sha256", None)},
}


def from_flat(config):
    """A configuration recorded before issue 30 (``FLAT_OPTIONS``) as ``YourModel.get_config`` records it
    now: each option's fields under its keyword, or None where the option is off (whose other keys never
    counted). Any other configuration is returned as it is: one that holds no flat key but the two that are
    keywords now too (``weight_decay``, ``label_smoothing``), and those with an option's fields or None."""
    flat_keys = {key for keys in FLAT_OPTIONS.values() for key in keys}
    if not any(
        key in config
        and (key not in FLAT_OPTIONS or not (config[key] is None or isinstance(config[key], dict)))
        for key in flat_keys
    ):
        return config
    nested = {key: value for key, value in config.items() if key not in flat_keys}
    for keyword, keys in FLAT_OPTIONS.items():
        switch, (_, off) = next(iter(keys.items()))
        on = config.get(switch, off) not in (None, 0)
        fields = {field: config.get(key, default) for key, (field, default) in keys.items() if field}
        nested[keyword] = fields if on else None
    return nested


def network_of(cls, config, model_file=None):
    """An (unbuilt) ``cls`` network with the recorded configuration ``config``: ``run_config``'s, or one
    recorded before issue 30 (read through ``from_flat``). Each option is made again from its recorded fields;
    initial weights, recorded by their file's content, start from ``model_file(sha256)``, the path of a model
    file with that content, and are off where it gives None (the configuration then differs from the
    record)."""
    config, options = from_flat(config), {}
    for keyword, kind in getattr(cls, "OPTIONS", {}).items():
        fields = config.get(keyword)
        if fields is not None and keyword == "initial_weights":
            path = model_file(fields["sha256"]) if model_file else None
            options[keyword] = kind(path) if path else None
        elif fields is not None:
            options[keyword] = kind(**fields)
    return cls(**{key: value for key, value in config.items() if key in cls.CONFIG_KEYS}, **options)


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
# Evaluations: what is computed from trained models
# --------------------------------------------------------------------------------------------------
EVALUATION_LIBRARIES = ("tensorflow", "keras", "numpy", "adversarial-robustness-toolbox")


def evaluation_versions():
    """The libraries whose versions an evaluation's key counts, and the oneDNN instruction-set pin
    (``ONEDNN_MAX_CPU_ISA``, None when unset), which changes the rounding of what TensorFlow computes."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in EVALUATION_LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return dict(versions, ONEDNN_MAX_CPU_ISA=os.environ.get("ONEDNN_MAX_CPU_ISA"))


_ARRAY_DIGESTS = {}  # id(array) -> (weak reference, digest): a large array is hashed once per process


def array_digest(array):
    """``joblib.hash`` of an array (its dtype, shape and bytes). The arrays an evaluation reads (images,
    labels) are never changed in place, so the digest of one array object is computed once."""
    import joblib

    known = _ARRAY_DIGESTS.get(id(array))
    if known is not None and known[0]() is array:
        return known[1]
    digest = joblib.hash(array)
    try:
        _ARRAY_DIGESTS[id(array)] = (weakref.ref(array), digest)
    except TypeError:  # an object without weak references: hashed at every call
        pass
    return digest


def weights_digest(model):
    """``joblib.hash`` of a Keras model's weights (every variable, in order): the model's content, the
    same for a network in memory and the same network loaded from its ``.h5``."""
    import joblib

    return joblib.hash([w for w in model.get_weights()])


def _is_keras_model(value):
    return hasattr(value, "get_weights") and hasattr(value, "layers") and callable(value)


def _qualified(obj):
    return f"{obj.__module__}:{obj.__qualname__}"


def _resolve(label):
    """The function or class that ``_qualified`` named "module:qualname"."""
    module, qualname = label.split(":")
    return functools.reduce(getattr, qualname.split("."), importlib.import_module(module))


def describe(value, code):
    """A JSON-able description of an evaluation's argument ``value``, for its key: a Keras model by its
    weights (``weights_digest``), an array or tensor by ``array_digest``, a number or string as itself,
    lists, tuples, dicts and dataclasses item by item, a Keras object with a ``get_config`` (a loss) by its
    class and configuration. A project function or class (an attack passed to an evaluation, a loss
    defined in the project) is named, and the fingerprint of its code goes into ``code``
    ({"module:qualname": sha256}). Anything else is a TypeError: an argument the key cannot see."""
    import numpy as np

    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return {"scalar": value.item(), "dtype": str(value.dtype)}
    if _is_keras_model(value):
        return {"model": weights_digest(value)}
    if isinstance(value, np.ndarray) or hasattr(value, "numpy"):
        return {"array": array_digest(np.asarray(value))}
    if isinstance(value, list | tuple):
        return [describe(item, code) for item in value]
    if isinstance(value, dict):
        return {
            str(key): describe(item, code) for key, item in sorted(value.items(), key=lambda kv: str(kv[0]))
        }
    if inspect.isfunction(value) or inspect.isclass(value):
        if not _is_project(value):
            return {"function": _qualified(value)}
        code[_qualified(value)] = function_fingerprint(value)
        return {"function": _qualified(value)}
    cls = type(value)
    if _is_project(cls):
        code[_qualified(cls)] = function_fingerprint(cls)
    if dataclasses.is_dataclass(value):
        fields = {f.name: describe(getattr(value, f.name), code) for f in dataclasses.fields(value)}
        return {"dataclass": _qualified(cls), "fields": fields}
    if hasattr(value, "get_config"):
        return {"object": _qualified(cls), "config": describe(value.get_config(), code)}
    raise TypeError(f"an evaluation's key cannot describe an argument of type {_qualified(cls)}: {value!r}")


def encode(value, save):
    """A JSON-able copy of an evaluation's result that ``decode`` turns back into an equal value: arrays
    exactly (bool arrays packed eight to a byte), NumPy scalars with their dtype, tuples and dicts with
    non-string keys tagged, dataclasses field by field, and a Keras model as ``save(model)`` records it
    (its file's path and sha256)."""
    import numpy as np

    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        raw = np.packbits(array).tobytes() if array.dtype == bool else array.tobytes()
        return {
            "__ndarray__": str(array.dtype),
            "shape": list(array.shape),
            "data": base64.b64encode(raw).decode(),
        }
    if _is_keras_model(value):
        return save(value)
    if isinstance(value, tuple):
        return {"__tuple__": [encode(item, save) for item in value]}
    if isinstance(value, list):
        return [encode(item, save) for item in value]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: encode(item, save) for key, item in value.items()}
        return {"__items__": [[encode(k, save), encode(v, save)] for k, v in value.items()]}
    if dataclasses.is_dataclass(value):
        fields = {f.name: encode(getattr(value, f.name), save) for f in dataclasses.fields(value)}
        return {"__dataclass__": _qualified(type(value)), "fields": fields}
    raise TypeError(f"an evaluation's result cannot hold a {_qualified(type(value))}: {value!r}")


class CorruptRecord(ValueError):
    """A record that cannot be decoded (damaged, or a model file it names missing or changed)."""


def _hashable(value):
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def decode(value, root):
    """The inverse of ``encode`` (model paths relative to ``root``); CorruptRecord when a part is damaged."""
    import numpy as np

    if isinstance(value, list):
        return [decode(item, root) for item in value]
    if not isinstance(value, dict):
        return value
    if "__ndarray__" in value:
        dtype, shape = np.dtype(value["__ndarray__"]), tuple(value["shape"])
        raw = np.frombuffer(base64.b64decode(value["data"]), dtype=np.uint8 if dtype.kind == "b" else dtype)
        count = int(np.prod(shape))
        if dtype.kind == "b":
            raw = np.unpackbits(raw)[:count].astype(bool)
        if raw.size != count:
            raise CorruptRecord(f"an array of {raw.size} values where its shape {shape} needs {count}")
        array = raw.reshape(shape).copy()
        return array[()] if shape == () else array
    if "__keras_model__" in value:
        import keras

        path = Path(root) / value["__keras_model__"]
        if not path.exists() or file_sha256(path) != value["sha256"]:
            raise CorruptRecord(f"its model file {path} is missing or not the recorded one")
        return keras.models.load_model(path, compile=False)
    if "__tuple__" in value:
        return tuple(decode(item, root) for item in value["__tuple__"])
    if "__items__" in value:
        return {_hashable(decode(k, root)): decode(v, root) for k, v in value["__items__"]}
    if "__dataclass__" in value:
        cls = _resolve(value["__dataclass__"])
        return cls(**{name: decode(item, root) for name, item in value["fields"].items()})
    return {key: decode(item, root) for key, item in value.items()}


@dataclass(frozen=True)
class Evaluation:
    """Where an evaluation's result came from: its record's name, the seconds it took when computed,
    when and from which commit it was computed, and whether this call reused it."""

    name: str
    seconds: float
    computed_at: str
    commit: str | None
    reused: bool


class EvaluationCache:
    """Computes what is measured on trained models once and reuses it while its key matches.

    ``cache(fn, *args, **kwargs)`` returns ``fn(*args, **kwargs)``: computed and recorded the first time,
    read back from the record afterwards. The key (see ``evaluation_parts``) counts the meaning of
    ``fn``'s code and of every project function it reaches or is passed (``function_fingerprint``), every
    argument (a model by its weights, an array by its digest), and the library versions. A record is
    ``<folder>/results/evaluations/<namespace>/<fn name>/<inputs digest>.json``, written atomically once
    the evaluation has finished (an interrupted evaluation leaves none); one whose key no longer matches,
    or that cannot be read or decoded, is computed again, never trusted. Models in a result (a training
    run's network) are saved beside it under ``<folder>/models/<namespace>/``. The same evaluation asked
    twice in one process is computed once. ``force``: compute every evaluation again.
    """

    def __init__(self, folder, namespace, force=False):
        self.folder = Path(folder)
        self.namespace = namespace
        self.force = force
        self.reused, self.computed = [], []
        self._memo = {}

    def __call__(self, fn, *args, **kwargs):
        return self.evaluate(fn, *args, **kwargs)[0]

    def evaluate(self, fn, *args, unkeyed=None, **kwargs):
        """(``fn(*args, **kwargs, **unkeyed)``, its ``Evaluation``). ``unkeyed``: keyword arguments that
        only change what is shown while it runs (a progress bar's label), left out of the key."""
        parts = evaluation_parts(fn, args, kwargs)
        key = key_of_evaluation(parts)
        name = f"{self.namespace}/{fn.__name__}/{_digest(parts['inputs'])[:16]}"
        if key in self._memo:
            return self._memo[key]
        path = self.record_path(name)
        record = None if self.force else _read_record(path)
        if record is not None and record.get("key") == key:
            try:
                result = decode(record["result"], self.folder)
            except (CorruptRecord, KeyError, ValueError, TypeError, OSError):
                result = None
            else:
                self.reused.append(name)
                self._memo[key] = answer = (result, self._evaluation(name, record, reused=True))
                return answer
        started = time.perf_counter()
        result = fn(*args, **kwargs, **(unkeyed or {}))
        seconds = time.perf_counter() - started
        encoded = encode(result, self._model_saver(name))
        record = dict(
            function=_qualified(fn), key=key, key_parts=parts, seconds=seconds, **provenance(), result=encoded
        )
        write_json(record, path)
        self.computed.append(name)
        self._memo[key] = answer = (
            decode(encoded, self.folder),
            self._evaluation(name, record, reused=False),
        )
        return answer

    def record_path(self, name):
        return self.folder / "results" / "evaluations" / f"{name}.json"

    def _model_saver(self, name):
        """``save(model)`` for ``encode``: the models of record ``name``'s result go to
        ``models/<name>/model<i>.h5`` (atomically), recorded by their path relative to the folder."""
        saved = []

        def save(model):
            from storage import save_model

            path = self.folder / "models" / name / f"model{len(saved)}.h5"
            save_model(model, path)
            saved.append(path)
            return {"__keras_model__": str(path.relative_to(self.folder)), "sha256": file_sha256(path)}

        return save

    def records(self):
        """{name: record} of every readable record of this cache's namespace (names sorted)."""
        root = self.folder / "results" / "evaluations"
        paths = sorted((root / self.namespace).rglob("*.json")) if (root / self.namespace).exists() else []
        return {str(p.relative_to(root).with_suffix("")): _read_record(p) for p in paths}

    def check(self):
        """(name, what is wrong) for every record of the namespace: an empty list when it is current (the
        code of every function it counts and the library versions as recorded, its models intact; the oneDNN
        pin, set by the notebook that computes it, is not judged here)."""
        versions, report = evaluation_versions(), []
        for name, record in self.records().items():
            if record is None:
                report.append((name, ["record unreadable"]))
                continue
            parts, reasons = record["key_parts"], []
            for label, recorded in parts["code"].items():
                try:
                    obj = _resolve(label)
                except (ImportError, AttributeError):
                    reasons.append(f"{label} gone")
                    continue
                if function_fingerprint(obj) != recorded:
                    reasons.append(f"code of {label} changed")
            if _libraries(parts["versions"]) != _libraries(versions):
                reasons.append("versions changed")
            for path, digest in _recorded_models(record["result"]):
                if not (self.folder / path).exists() or file_sha256(self.folder / path) != digest:
                    reasons.append(f"model file {path} missing or changed")
            report.append((name, reasons))
        return report

    @staticmethod
    def _evaluation(name, record, reused):
        return Evaluation(name, record["seconds"], record["computed_at"], record["commit"], reused)


def _libraries(versions):
    """The library versions of an evaluation's ``versions`` part, without the environment's oneDNN pin: a
    notebook sets the pin for itself (Part 2 does), so ``check``, run from a shell, cannot judge it; a call
    under another pin still finds a different key and computes again."""
    return {name: version for name, version in versions.items() if name in EVALUATION_LIBRARIES}


def evaluation_parts(fn, args, kwargs):
    """The key of ``fn(*args, **kwargs)``: ``function`` (its module and name), ``code`` ({"module:qualname":
    fingerprint} of ``fn`` and of every project function or class among the arguments), ``inputs`` (the
    arguments, described by ``describe``) and ``versions`` (``evaluation_versions``)."""
    code = {_qualified(fn): function_fingerprint(fn)}
    inputs = {"args": describe(list(args), code), "kwargs": describe(dict(kwargs), code)}
    return {"function": _qualified(fn), "code": code, "inputs": inputs, "versions": evaluation_versions()}


def key_of_evaluation(parts):
    return _digest({part: parts[part] for part in ("function", "code", "inputs", "versions")})


def _read_record(path):
    """The JSON record at ``path``, or None when it is missing or unreadable (computed again)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _recorded_models(encoded):
    """(path, sha256) of every model a record's result names."""
    if isinstance(encoded, list):
        return [found for item in encoded for found in _recorded_models(item)]
    if not isinstance(encoded, dict):
        return []
    if "__keras_model__" in encoded:
        return [(encoded["__keras_model__"], encoded["sha256"])]
    return [found for item in encoded.values() for found in _recorded_models(item)]


FRESH_CHOICES = ("", "evaluations", "all")


def fresh_switch(fresh):
    """The notebooks' ``FRESH`` parameter as (retrain, recompute): "" reuses every current training and
    evaluation, "evaluations" recomputes every evaluation, "all" retrains every model and recomputes every
    evaluation. Anything else is a ValueError naming the allowed values."""
    if fresh not in FRESH_CHOICES:
        raise ValueError(f"FRESH={fresh!r}; allowed: {', '.join(map(repr, FRESH_CHOICES))}.")
    return fresh == "all", fresh in ("evaluations", "all")


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

    with contextlib.redirect_stdout(io.StringIO()):  # the data manager prints per-class counts
        data = animals_data(args.animals, args.max_images)
    report = ExperimentCache(args.folder, data).check()
    for name, reasons in report:
        print(f"{name}: {'current' if not reasons else 'stale (' + ', '.join(map(_reason, reasons)) + ')'}")
    stale = sum(1 for _, reasons in report if reasons)
    print(f"{len(report)} entries, all current" if not stale else f"{len(report)} entries, {stale} stale")
    evaluations = evaluation_report(args.folder)
    for name, reasons in evaluations:
        if reasons:  # the current ones are counted, not listed: there are many
            print(f"evaluation {name}: stale ({', '.join(reasons)})")
    stale_evaluations = sum(1 for _, reasons in evaluations if reasons)
    print(
        f"{len(evaluations)} evaluations, all current"
        if not stale_evaluations
        else f"{len(evaluations)} evaluations, {stale_evaluations} stale"
    )
    return 0 if report and not stale and not stale_evaluations else 1


def _reason(reason):
    """A stale reason as the command prints it: a key part "changed", a model file's problem as it is."""
    return f"{reason} changed" if reason in KEY_PARTS else reason


def evaluation_report(folder):
    """``EvaluationCache.check`` over every namespace (sub-folder) of ``folder/results/evaluations``."""
    root = Path(folder) / "results" / "evaluations"
    namespaces = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
    return [found for namespace in namespaces for found in EvaluationCache(folder, namespace).check()]


if __name__ == "__main__":
    sys.exit(main())
