"""Atomic file writers: a JSON document and a Keras model, each written to a temporary file in the
target's folder and renamed over the target, so an interrupted run leaves the old file or none,
never half of one. Files are created readable by everyone (mode 0644), like any other file here."""

import dataclasses
import hashlib
import json
import os


def _write_atomically(path, write):
    """Calls ``write(tmp_path)``, then renames ``tmp_path`` to ``path``. The temporary file is
    ``<name>.partial.<ext>`` (git-ignored; Keras insists on the extension) and is removed if
    ``write`` fails."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.partial{ext}"
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path):
    """``json.dump(obj)`` (indent 1) to ``path``, atomically. A dataclass instance in ``obj`` (an option
    object of ``models.YourModel`` that a notebook records) is written as the dict of its fields."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=_fields)

    _write_atomically(path, write)


def _fields(value):
    """``json.dump``'s fallback: a dataclass instance as its fields; anything else stays a TypeError."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def save_model(model, path):
    """``model.save(path)`` atomically, without the optimizer state: the file holds the trained
    network only (a third of the size). The format follows the extension (``.h5`` here)."""
    _write_atomically(path, lambda tmp: model.save(tmp, include_optimizer=False))


def file_sha256(path):
    """The sha256 of a file's content (hex): names a saved model by what it holds, not where it is."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
