"""Build the submission zip the assignment asks for (`make submission` calls it from the project root).

    python tools/make_submission.py [--example] FOLDER NOTEBOOK.ipynb ...

writes FOLDER/<student_id>_assignment01_solution.zip, the ID from student.json. First, everything must agree
with student.json (tools/personalise.py's `problems`), or the build is refused with one line per problem
naming it and the command that fixes it: student.json missing or bad, or still holding the template's
placeholders (accepted with --example, the committed example's build); a notebook whose Student
Information block differs from it; Part 1's Question 1.3 computed for another student ID. So a zip named for
one student never holds another's notebooks.

The zip is the project cut down to what the notebooks need to run and to reuse their training, so that
a marker can unzip it, add the Animals images and execute any notebook without retraining:

- the notebooks, their HTML exports (made afresh by export_html.sh, which refuses a broken notebook) and
  every local image their Markdown shows;
- models.py and every project module the notebooks import, followed through the modules' own imports;
- student.json and requirements.txt;
- results/: the figures (part*.json), every experiment-cache record (results/cache/**/*.json) and every
  evaluation record (results/evaluations/**/*.json: what was measured on the models, and Part 2's runs);
- every model those name: models/<entry>.h5 of each cache record, the model a record was trained from
  (found by its recorded sha256), the networks of Part 2's run records, and each models/... .h5 path that
  results/part*.json mentions;
- README.md: how to run it (written by this script, not the project's README).

Nothing is typed into a list here: every file comes from the notebooks, the records or the results, so
the zip follows them. A file they name that is missing (or an image outside the project) is refused
before anything is exported. Prints the files and the zip's size. Paths are relative to the current
folder; $PYTHON is passed on to export_html.sh.
"""

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import personalise

IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)|<img[^>]*\ssrc=[\"']([^\"']+)[\"']")
CACHE = Path("results") / "cache"
EVALUATIONS = Path("results") / "evaluations"

README = """\
# FIT3181 Assignment 1: the submission, ready to run

The notebooks ({notebooks}) are the solution, executed top to bottom in the full profile; the
`*_output.html` files show the same as HTML. The Python modules beside them are the code the notebooks
import; `models/` holds the {models} trained models, and `results/cache/` and `results/evaluations/` the
records that let the notebooks reuse them, and what was measured on them, instead of computing for hours.

To run a notebook here (Python 3.11), install the pinned versions and give Part 3 the Animals images:

```bash
python3.11 -m venv .venv && .venv/bin/pip install -r requirements.txt
mkdir -p datasets && ln -s /path/to/Animals datasets/Animals   # or: export ANIMALS_DIR=/path/to/Animals
.venv/bin/jupyter notebook        # or: .venv/bin/papermill NB.ipynb executed.ipynb
```

The Animals images (`<class>/<image>`, from the course's Moodle page) are not in the zip; Part 3 stops with
a one-line error naming the folder if they are missing. Part 2 downloads Fashion-MNIST itself through Keras.
Parts 2 and 3 reuse every model and evaluation whose record still matches the code, data and library versions
(each ends with a line saying what it reused and what it computed); `.venv/bin/python -m experiments check`
says whether every record is current. Set `FRESH = "evaluations"` in a notebook's parameters cell to
recompute what is measured on the models, or `FRESH = "all"` to retrain everything too (hours on a CPU).
"""


def local_images(notebook):
    """The local image files that the Markdown cells of `notebook` show (URLs skipped); exits with an
    error naming the first one that is not a file inside the project."""
    figures = []
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type != "markdown":
            continue
        for ref in (a or b for a, b in IMAGE.findall(cell.source)):
            if re.match(r"[a-z]+:", ref):
                continue
            path = os.path.normpath(ref)
            if path.startswith("..") or os.path.isabs(path) or not os.path.isfile(path):
                sys.exit(
                    f"error: {notebook} shows the image {ref!r}, which is not a file inside the project; "
                    "copy it into the project and refer to it by a relative path"
                )
            figures.append(path)
    return figures


def imported_names(source):
    """The top-level module names that Python source imports (absolute imports only), except those
    imported inside a ``try`` that catches ImportError (optional, e.g. cleverhans for a cross-check)."""
    names, optional = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
            for h in node.handlers
        ):
            optional |= imported_names(ast.unparse(ast.Module(body=node.body, type_ignores=[])))
    return names - optional


def notebook_source(notebook):
    """The code cells of `notebook` as one Python source, IPython's magics and shell lines left out."""
    cells = [c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    lines = [
        line
        for cell in cells
        if not cell.lstrip().startswith("%%")
        for line in cell.splitlines()
        if not line.lstrip().startswith(("%", "!"))
    ]
    return "\n".join(lines)


def project_modules(notebooks):
    """models.py and every project module (a .py file of this folder) that the notebooks import, with
    the project modules those import in turn; sorted, models.py first. A name that is neither a project
    module nor installed here (a module left out of the project) is added as ``<name>.py``, so that it
    is refused as missing."""
    found = set()
    queue = ["models", *(name for nb in notebooks for name in imported_names(notebook_source(nb)))]
    while queue:
        name = queue.pop()
        path = Path(f"{name}.py")
        if name in found or not path.is_file() and importlib.util.find_spec(name) is not None:
            continue
        found.add(name)
        if path.is_file():
            queue.extend(imported_names(path.read_text()))
    return ["models.py", *sorted(f"{name}.py" for name in found - {"models"})]


def mentioned_models(value):
    """Every string ending in .h5 inside a JSON value (the models that results/part*.json report on)."""
    if isinstance(value, str):
        return [value] if value.endswith(".h5") else []
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [path for item in items for path in mentioned_models(item)]


def saved_models(value):
    """The model files an evaluation record's result names ({"__keras_model__": path, ...}: Part 2's runs)."""
    if isinstance(value, dict) and "__keras_model__" in value:
        return [value["__keras_model__"]]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [path for item in items for path in saved_models(item)]


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def results_and_models():
    """results/part*.json, every cache record, and the models they name (see the module docstring).
    Returns (files, problems): problems name what is missing, one line each."""
    results = sorted(str(p) for p in Path("results").glob("part*.json"))
    records = sorted(str(p) for p in CACHE.rglob("*.json"))
    evaluations = sorted(str(p) for p in EVALUATIONS.rglob("*.json"))
    models, problems, sources = [], [], []
    for record in evaluations:
        models += saved_models(json.loads(Path(record).read_text()).get("result"))
    for record in records:
        name = str(Path(record).relative_to(CACHE)).removesuffix(".json")  # names hold dots: "rho0.05"
        models.append(str(Path("models") / f"{name}.h5"))
        config = json.loads(Path(record).read_text()).get("key_parts", {}).get("config", {})
        if config.get("initial_weights"):  # trained from a saved model, recorded by its sha256
            sources.append((record, config["initial_weights"]["sha256"]))
    for result in results:
        for path in mentioned_models(json.loads(Path(result).read_text())):
            normal = os.path.normpath(path)
            if normal.startswith("..") or os.path.isabs(normal):
                problems.append(f"{result} names the model {path!r}, which is outside the project")
            else:
                models.append(normal)
    models = sorted(set(models))
    problems += [
        f"{path} (named by the cache records or results)" for path in models if not Path(path).is_file()
    ]
    digests = {sha256(path): path for path in models if Path(path).is_file()}
    for record, digest in sources:
        if digest in digests:
            continue
        elsewhere = [str(p) for p in Path("models").rglob("*.h5") if sha256(p) == digest]
        if elsewhere:
            models.append(elsewhere[0])
        else:
            problems.append(f"the model {record} was trained from (sha256 {digest[:12]}...)")
    return results + records + evaluations + sorted(set(models)), problems


def main(argv):
    parser = argparse.ArgumentParser(description="Build <student_id>_assignment01_solution.zip in FOLDER.")
    parser.add_argument("--example", action="store_true", help="accept the template's placeholders")
    parser.add_argument("folder", type=Path)
    parser.add_argument("notebooks", nargs="+")
    args = parser.parse_args(argv)
    notebooks = args.notebooks
    missing = [nb for nb in notebooks if not Path(nb).is_file()]
    if missing:
        sys.exit(f"error: cannot build the submission: missing {', '.join(missing)}")
    refused = personalise.problems(notebooks, args.example)
    if refused:
        sys.exit("\n".join(f"error: cannot build the submission: {line}" for line in refused))
    target = args.folder / f"{personalise.read_student()['student_id']}_assignment01_solution.zip"
    figures = [path for nb in notebooks for path in local_images(nb)]
    files = [*notebooks, *project_modules(notebooks), "student.json", "requirements.txt", *figures]
    data, problems = results_and_models()
    problems = [f for f in files if not Path(f).is_file()] + problems
    files += data
    if problems:
        sys.exit(f"error: cannot build {target}: missing {'; '.join(problems)}")
    if subprocess.run(["bash", "export_html.sh", *notebooks]).returncode != 0:
        sys.exit(f"error: cannot build {target}: the HTML export failed")
    html = [nb.replace("_solution.ipynb", "_output.html") for nb in notebooks]
    files = list(dict.fromkeys([*notebooks, *html, *files]))
    readme = README.format(
        notebooks=", ".join(f"`{nb}`" for nb in notebooks),
        models=sum(1 for f in files if f.endswith(".h5")),
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("README.md", readme)
        for f in files:
            zf.write(f)
    os.replace(partial, target)
    print(f"{target}:", "README.md", *files, sep="\n  ")
    print(f"{target}: {len(files) + 1} files, {target.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
