"""One-off migration of the experiment cache's keys to the semantic scheme of ``experiments.py``.

Until commit 8436b95 a cache entry's key hashed its configuration, the data fingerprint and the raw
source text of 15 hand-listed objects of ``models.py``. For every entry under ``results/cache/`` this
script first proves that the entry was current under that scheme: it loads ``models.py`` as it was at
8436b95 (from git) and recomputes the old key from the recorded configuration, the data and that code;
it must equal the recorded key. Only then does it write the new key (``experiments.key_parts`` with
the current code) into the record. No model is retrained and no ``.h5`` file is touched. An entry
that is already migrated is only reported; an entry that fails the proof is left as it is, and the
script exits with status 1.

    python tools/migrate_cache_keys.py [--folder .] [--animals datasets/Animals]
"""

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OLD_COMMIT = "8436b95"

import experiments  # noqa: E402
import models  # noqa: E402
from storage import write_json  # noqa: E402


def old_models_module():
    """models.py as it was at OLD_COMMIT, imported under the name ``models_8436b95``."""
    source = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:models.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "models_8436b95.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("models_8436b95", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def old_key(config, data_fingerprint, code_hash):
    """The key as ``cached_fit`` computed it at OLD_COMMIT."""
    return hashlib.sha256(
        json.dumps([config, data_fingerprint, code_hash], sort_keys=True, default=str).encode()
    ).hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=str(ROOT), help="folder holding models/ and results/cache/")
    parser.add_argument(
        "--animals", default=None, help="the Animals folder (default: $ANIMALS_DIR or datasets/Animals)"
    )
    args = parser.parse_args()

    with contextlib.redirect_stdout(io.StringIO()):
        data = experiments.animals_data(args.animals)
    old = old_models_module()
    old_code, data_fp = old.training_code_hash(), experiments.data_fingerprint(data)
    cache = experiments.ExperimentCache(args.folder, data)
    failed = 0
    for name in cache.entries():
        path = cache.record_path(name)
        record = json.loads(path.read_text())
        if "key_parts" in record:
            print(f"{name}: already migrated")
            continue
        config = record["config"]
        if old_key(config, data_fp, old_code) != record["key"]:
            print(
                f"{name}: NOT current under the old scheme (its key does not match {OLD_COMMIT}'s code and "
                "this data); left as it is"
            )
            failed += 1
            continue
        cls = getattr(models, config["class"])
        network = experiments.network_of(cls, config)
        parts = experiments.key_parts(network, data, config["fit_batch_size"], config["fit_num_epochs"])
        if parts["config"] != config:
            print(
                f"{name}: the current code reads its configuration differently "
                f"({parts['config']} vs {config}); left as it is"
            )
            failed += 1
            continue
        migrated = dict(
            key=experiments.key_of(parts),
            key_parts=parts,
            migrated_from=record["key"],
            **{k: v for k, v in record.items() if k not in ("key", "config")},
        )
        write_json(migrated, path)
        print(f"{name}: current under {OLD_COMMIT}'s key; new key {migrated['key'][:12]}")
    print(f"{failed} entries could not be migrated" if failed else "all entries migrated")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
