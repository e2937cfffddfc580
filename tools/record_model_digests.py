"""Record in every experiment-cache entry the sha256 of its model file, and where it came from.

    python tools/record_model_digests.py

The cache checks each entry's model file against this digest before it reuses the entry (a damaged or
replaced file is refused, never loaded as the entry's model), so the digest must be that of the file the
entry trained. Entries trained before the digest was recorded get it here, and only from a file git
vouches for: tracked and identical to the committed version (HEAD). Their provenance comes from git too:
``commit`` and ``computed_at`` are the commit that last changed the model file, and its date (the entry's
training happened before it). An entry that already holds a digest is left as it is. Nothing is retrained
and no key changes.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from storage import file_sha256, write_json  # noqa: E402


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def committed_unchanged(path):
    """True when git tracks ``path`` and the working tree's file is the one committed at HEAD."""
    relative = str(path.relative_to(ROOT))
    tracked = git("ls-files", "--error-unmatch", relative).returncode == 0
    return tracked and git("diff", "--quiet", "HEAD", "--", relative).returncode == 0


def main():
    cache = ROOT / "results" / "cache"
    added = kept = 0
    for record_path in sorted(cache.rglob("*.json")):
        name = record_path.relative_to(cache).with_suffix("")
        record = json.loads(record_path.read_text())
        if "model_sha256" in record:
            kept += 1
            continue
        model = ROOT / "models" / f"{name}.h5"
        if not committed_unchanged(model):
            sys.exit(
                f"error: {model} is not the committed file (or not tracked): its digest cannot be vouched for"
            )
        commit, date = git("log", "-1", "--format=%h %cI", "--", str(model.relative_to(ROOT))).stdout.split()
        record.update(
            model_sha256=file_sha256(model),
            commit=commit,
            computed_at=date,
            provenance="from git: the commit that last changed the model file, and its date",
        )
        write_json(record, record_path)
        added += 1
        print(f"{name}: sha256 {record['model_sha256'][:12]}..., model committed in {commit} on {date}")
    print(f"{added} entries given their model's digest, {kept} already had one")


if __name__ == "__main__":
    main()
