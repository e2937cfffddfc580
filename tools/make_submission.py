"""Build the submission zip the assignment asks for (`make submission` calls it from the project root).

    python tools/make_submission.py TARGET.zip NOTEBOOK.ipynb ...

The zip holds the notebooks, their HTML exports (made afresh by export_html.sh, which refuses a broken
notebook), models.py and the library modules beside it (every top-level .py file: models.py imports
them), models/*.h5 and every local image the notebooks' Markdown shows. A missing part or
an image outside the project is refused before anything is exported. Paths are relative to the current
folder; $PYTHON is passed on to export_html.sh.
"""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat

IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)|<img[^>]*\ssrc=[\"']([^\"']+)[\"']")


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


def main(argv):
    target, notebooks = Path(argv[0]), argv[1:]
    missing = [nb for nb in notebooks if not Path(nb).is_file()]
    if missing:
        sys.exit(f"error: cannot build {target}: missing {', '.join(missing)}")
    figures = [path for nb in notebooks for path in local_images(nb)]
    if subprocess.run(["bash", "export_html.sh", *notebooks]).returncode != 0:
        sys.exit(f"error: cannot build {target}: the HTML export failed")
    files = [f for nb in notebooks for f in (nb, nb.replace("_solution.ipynb", "_output.html"))]
    files += [
        "models.py",
        *sorted(str(p) for p in Path(".").glob("*.py")),
        *sorted(str(p) for p in Path("models").glob("*.h5")),
        *figures,
    ]
    files = list(dict.fromkeys(files))
    absent = [f for f in files if not Path(f).is_file()]
    if absent:
        sys.exit(f"error: cannot build {target}: missing {', '.join(absent)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(f)
    os.replace(partial, target)
    print(f"{target}:", *files, sep="\n  ")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python tools/make_submission.py TARGET.zip NOTEBOOK.ipynb ...")
    main(sys.argv[1:])
