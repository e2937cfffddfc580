"""The foundation: data provisioning, the Animals check, profile isolation, HTML export, the submission zip
and the README's results table."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from conftest import REPO_ROOT, animals_dir, git, run
from test_claims import check_quick_profile_words

NOTEBOOKS = [f"Assignment01_Part{n}_solution.ipynb" for n in (1, 2, 3)]
FASHION_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
PROVISION = REPO_ROOT / "datasets" / "provision_fashion_mnist.sh"
EXPORT = REPO_ROOT / "export_html.sh"


# --- Fashion-MNIST ---------------------------------------------------------------------------------

OFFLINE_LOAD = """
import json, socket
def refuse(*args, **kwargs):
    raise OSError("network access is disabled in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
import tensorflow as tf
(x, y), (xt, yt) = tf.keras.datasets.fashion_mnist.load_data()
print(json.dumps({"train": [list(x.shape), str(x.dtype), list(y.shape)],
                  "test": [list(xt.shape), str(xt.dtype), list(yt.shape)]}))
"""


def load_fashion_mnist_offline(home):
    """load_data() in a fresh interpreter with HOME=home and every socket connection refused."""
    unroutable = "http://10.255.255.1:9"
    env = {
        "HOME": str(home),
        "http_proxy": unroutable,
        "https_proxy": unroutable,
        "HTTP_PROXY": unroutable,
        "HTTPS_PROXY": unroutable,
    }
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "KERAS_HOME"}
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOAD], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_fashion_mnist_shapes(shapes):
    assert shapes["train"] == [[60000, 28, 28], "uint8", [60000]]
    assert shapes["test"] == [[10000, 28, 28], "uint8", [10000]]


def debian_package_installed():
    """Whether Debian's dataset-fashion-mnist package is installed here."""
    return shutil.which("dpkg") is not None and run(["dpkg", "-s", "dataset-fashion-mnist"]).returncode == 0


def test_provisioned_fashion_mnist_loads_without_network(tmp_path):
    """Provisioning fills an empty cache (a temporary HOME); load_data() then needs no network."""
    proc = run(["bash", str(PROVISION)], env={"HOME": str(tmp_path), "KERAS_HOME": ""})
    if proc.returncode != 0 and not debian_package_installed():
        pytest.skip("the Debian package dataset-fashion-mnist is absent and could not be installed here")
    assert proc.returncode == 0, proc.stderr
    cache = tmp_path / ".keras" / "datasets" / "fashion-mnist"
    assert all((cache / f).stat().st_size > 0 for f in FASHION_FILES)
    assert_fashion_mnist_shapes(load_fashion_mnist_offline(tmp_path))


def test_provisioning_links_the_debian_files_into_an_empty_cache(tmp_path):
    if not debian_package_installed():
        pytest.skip("the Debian package dataset-fashion-mnist is not installed here")
    env = {"HOME": str(tmp_path), "KERAS_HOME": ""}
    first = run(["bash", str(PROVISION)], env=env)
    assert first.returncode == 0, first.stderr
    cache = tmp_path / ".keras" / "datasets" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(FASHION_FILES)
    assert all((cache / f).is_symlink() for f in FASHION_FILES)
    second = run(["bash", str(PROVISION)], env=env)
    assert second.returncode == 0 and "are in" in second.stdout
    assert sorted(p.name for p in cache.iterdir()) == sorted(FASHION_FILES)


def test_provisioning_without_package_or_files_says_what_to_do(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("apt-get", "dpkg", "sudo"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    proc = run(
        ["bash", str(PROVISION)],
        env={"HOME": str(tmp_path), "KERAS_HOME": "", "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    assert proc.returncode != 0
    cache = tmp_path / ".keras" / "datasets" / "fashion-mnist"
    assert str(cache) in proc.stderr
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
    assert "github.com/zalandoresearch/fashion-mnist" in proc.stderr
    assert all(f in proc.stderr for f in FASHION_FILES)


# --- Animals ---------------------------------------------------------------------------------------


def check_animals(path, optional=False):
    args = ["make", "-s", "--no-print-directory", "animals"] + (["ANIMALS_OPTIONAL=1"] if optional else [])
    return run(args, env={"ANIMALS_DIR": str(path)})


@pytest.mark.parametrize("layout", ["missing", "empty folder", "class folders without images"])
def test_animals_check_names_the_path_and_the_variable(tmp_path, layout):
    path = tmp_path / "Animals"
    if layout != "missing":
        path.mkdir()
    if layout == "class folders without images":
        (path / "cats").mkdir()
    proc = check_animals(path)
    assert proc.returncode != 0
    assert str(path) in proc.stderr and "ANIMALS_DIR" in proc.stderr
    warned = check_animals(path, optional=True)
    assert warned.returncode == 0 and "warning" in warned.stderr and str(path) in warned.stderr


def test_animals_check_accepts_a_folder_with_images(tmp_path):
    (tmp_path / "Animals" / "cats").mkdir(parents=True)
    (tmp_path / "Animals" / "cats" / "cat.0.jpg").write_bytes(b"\xff\xd8")
    proc = check_animals(tmp_path / "Animals")
    assert proc.returncode == 0, proc.stderr


# --- profile isolation -----------------------------------------------------------------------------


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_quick_profile_leaves_the_checkout_clean(notebook, quick_profile_run):
    """As `make quick` does: the quick profile, default output folder, writes under runs/quick/ only."""
    if not (REPO_ROOT / notebook).is_file():
        pytest.skip(f"{notebook} is not written yet")
    if notebook.endswith("Part3_solution.ipynb") and animals_dir() is None:
        pytest.skip("Part 3 needs the Animals data (datasets/Animals or ANIMALS_DIR)")
    checkout, proc = quick_profile_run(notebook)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert git("status", "--porcelain", "--untracked-files=all", cwd=checkout).stdout == ""
    part = notebook.split("_")[1].lower()
    assert (checkout / "runs" / "quick" / "results" / f"{part}.json").is_file()
    if part in ("part2", "part3"):  # the prose of the same run: its comparative sentences and their records
        check_quick_profile_words(checkout, notebook)


# --- HTML export -----------------------------------------------------------------------------------

KERNELSPEC = {"name": "python3", "language": "python", "display_name": "Python 3"}


def notebook(path, cells):
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC}), path)
    return path


def executed(source, count, outputs=(), tags=()):
    return new_code_cell(source, execution_count=count, outputs=list(outputs), metadata={"tags": list(tags)})


def export(*args):
    return run(["bash", str(EXPORT), *map(str, args)], env={"PYTHON": sys.executable})


def test_export_refuses_a_notebook_with_an_unexecuted_cell(tmp_path):
    nb = notebook(
        tmp_path / "Unrun_solution.ipynb",
        [new_markdown_cell("# t"), executed("x = 1", 1), new_code_cell("y = x + 1")],
    )
    proc = export(nb)
    assert proc.returncode != 0
    assert str(nb) in proc.stderr and "cell 3" in proc.stderr and "not executed" in proc.stderr
    assert not (tmp_path / "Unrun_output.html").exists()


def test_export_refuses_a_notebook_with_an_error_output(tmp_path):
    error = new_output("error", ename="ZeroDivisionError", evalue="division by zero", traceback=[])
    nb = notebook(tmp_path / "Failed_solution.ipynb", [executed("x = 1", 1), executed("1 / 0", 2, [error])])
    proc = export(nb)
    assert proc.returncode != 0
    assert str(nb) in proc.stderr and "cell 2" in proc.stderr and "ZeroDivisionError" in proc.stderr
    assert not (tmp_path / "Failed_output.html").exists()


def test_export_refuses_cells_run_out_of_order(tmp_path):
    nb = notebook(tmp_path / "Shuffled_solution.ipynb", [executed("x = 1", 2), executed("y = 2", 1)])
    proc = export(nb)
    assert proc.returncode != 0 and "cell 2" in proc.stderr and "out of order" in proc.stderr


def test_export_converts_a_clean_notebook(tmp_path):
    shown = new_output("stream", name="stdout", text="forty-two\n")
    cells = [new_markdown_cell("# Clean"), executed("print('forty-two')", 1, [shown]), new_code_cell("")]
    nb = notebook(tmp_path / "Clean_solution.ipynb", cells)
    proc = export(nb)
    assert proc.returncode == 0, proc.stderr
    assert "forty-two" in (tmp_path / "Clean_output.html").read_text()


def test_export_adds_the_print_style_after_the_theme(tmp_path):
    """Printed, long code lines wrap instead of being cut off: the print style comes after the theme's
    variables it overrides (the later of two equally specific rules wins)."""
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from export_notebooks import PRINT_CSS, with_print_style

    nb = notebook(tmp_path / "Printed_solution.ipynb", [executed("x = 1", 1)])
    assert export(nb).returncode == 0
    html = (tmp_path / "Printed_output.html").read_text()
    assert "white-space: pre-wrap" in PRINT_CSS and "--jp-code-font-size: 10px" in PRINT_CSS
    assert html.count(PRINT_CSS) == 1
    assert html.index(PRINT_CSS) > html.rindex("--jp-code-font-size: 13px") and html.index(
        PRINT_CSS
    ) < html.index("</head>")
    with pytest.raises(ValueError, match="no </head>"):
        with_print_style("<html><body>no head</body></html>")


def text_outside_code(html):
    """The text of an exported page's body that is not code: tags, <code>, <pre>, <script> and <style>
    elements removed, entities decoded."""
    import html as entities
    import re

    body = html[html.index("<body") :]
    for element in ("script", "style", "pre", "code"):
        body = re.sub(rf"<{element}\b.*?</{element}>", " ", body, flags=re.S)
    return entities.unescape(re.sub(r"<[^>]*>", " ", body))


def test_export_renders_math_as_mathml_without_mathjax(tmp_path):
    """Offline, MathJax cannot load: every formula, in a Markdown cell or in the Markdown a code cell
    displays, is MathML in the HTML itself; a `$` in code or escaped stays as written, and a formula that
    cannot be converted shows as its source (with a warning naming it), never as `$...$`."""
    prose = (
        "Inline $\\epsilon = 0.03$ and `cost = $5 and $6` in code, \\$3 escaped; display:\n\n"
        "$$\\hat y = \\arg\\max_k \\frac{e^{h_k}}{\\sum_j e^{h_j}}$$\n\n```\nprice = $7 + $8\n```"
    )
    shown = new_output("display_data", data={"text/markdown": "Output $x^2$, `echo $HOME`, bad $\\frac{1}{$"})
    cells = [new_markdown_cell(prose), executed("display(Markdown(...))", 1, [shown], ["remove_input"])]
    proc = export(notebook(tmp_path / "Math_solution.ipynb", cells))
    assert proc.returncode == 0, proc.stderr
    html = (tmp_path / "Math_output.html").read_text()
    assert "mathjax" not in html.lower()
    assert html.count("<math ") == 3 and html.count('display="block"') == 1  # x^2, epsilon, the display
    assert "<mfrac>" in html and "<msup><mi>x</mi><mn>2</mn></msup>" in html
    assert "<code>cost = $5 and $6</code>" in html and "<code>echo $HOME</code>" in html
    assert "price = $7 + $8" in html
    assert '<code class="tex-source">\\frac{1}{</code>' in html and "\\\\frac{1}{" in proc.stderr
    assert "\\arg" not in html  # latex2mathml lacks \arg: spelled \mathrm{arg}
    assert text_outside_code(html).count("$") == 1 and "$3 escaped" in text_outside_code(html)


def test_export_hides_the_input_of_remove_input_cells_and_drops_remove_cell_cells(tmp_path):
    def printing(source_marker, output_marker, count, tags=()):
        """A cell whose source holds `source_marker` and whose output is `output_marker`."""
        source = f"# {source_marker}\nprint({output_marker[:4]!r} + {output_marker[4:]!r})"
        stream = new_output("stream", name="stdout", text=output_marker + "\n")
        return executed(source, count, [stream], tags)

    nb = notebook(
        tmp_path / "Tagged_solution.ipynb",
        [
            printing("shownsource1b7e", "shownoutput4c0d", 1),
            printing("hiddensource7f3a", "keptoutput9c2e", 2, ["remove_input"]),
            printing("droppedsource2d5b", "droppedoutput6a1f", 3, ["remove_cell"]),
            printing("injectedsource5e1c", "injectedoutput8b3d", 4, ["injected-parameters"]),
        ],
    )
    proc = export(nb)
    assert proc.returncode == 0, proc.stderr
    html = (tmp_path / "Tagged_output.html").read_text()
    assert "shownsource1b7e" in html and "shownoutput4c0d" in html  # an untagged cell shows both
    assert "hiddensource7f3a" not in html and "keptoutput9c2e" in html
    assert "droppedsource2d5b" not in html and "droppedoutput6a1f" not in html
    assert "injectedsource5e1c" not in html and "injectedoutput8b3d" not in html


@pytest.mark.notebook
def test_export_execute_runs_the_notebook_in_place_first(tmp_path):
    params = new_code_cell('PROFILE = "quick"', metadata={"tags": ["parameters"]})
    nb = notebook(tmp_path / "Fresh_solution.ipynb", [params, new_code_cell("print('profile', PROFILE)")])
    proc = export("--execute", nb)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = nbformat.read(nb, as_version=4).cells
    assert all(c.execution_count for c in cells if c.cell_type == "code")
    assert "profile full" in (tmp_path / "Fresh_output.html").read_text()


# --- submission zip --------------------------------------------------------------------------------


STUDENT = {
    "surname": "Tran",
    "first_name": "Mai",
    "student_id": 424242,
    "email": "mai.tran@example.org",
    "tutorial_time": "Mon 9:00",
}


def student_cell(student):
    """The Student Information block showing ``student``, as `make student` writes it."""
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from personalise import TAG, student_block

    return new_markdown_cell(student_block(student), metadata={"tags": [TAG]})


@pytest.fixture
def project(tmp_path):
    """A copy of the project's commands, with student.json, three small executed notebooks showing it in
    their Student Information blocks (Part 3 imports a module), results/part1.json for its ID,
    models.py and a module it imports, a module nothing imports, results naming a model, a cache entry
    (in a sub-folder, trained from the first model) and its model, a model nothing names, a figure."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("Makefile", "export_html.sh", "requirements.txt", "requirements-dev.txt", "report.py"):
        shutil.copy2(REPO_ROOT / name, root / name)
    shutil.copytree(REPO_ROOT / "tools", root / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".venv").symlink_to(Path(sys.prefix))
    (root / "student.json").write_text(json.dumps(STUDENT))
    (root / "models.py").write_text("import attacks\n")
    (root / "attacks.py").write_text("VALUE = 1\n")
    (root / "models").mkdir()
    (root / "models" / ".gitkeep").write_text("")
    (root / "models" / "Part3_Sec3_4_best.h5").write_bytes(b"model")
    (root / "models" / "grid").mkdir()
    (root / "models" / "grid" / "Part3_rho0.05.h5").write_bytes(b"entry")
    (root / "models" / "unreported.h5").write_bytes(b"unreported")
    (root / "helpers.py").write_text("VALUE = 2\n")
    (root / "unused.py").write_text("VALUE = 3\n")
    (root / "results" / "cache" / "grid").mkdir(parents=True)
    (root / "results" / "part3.json").write_text(
        json.dumps({"best": {"model": "models/Part3_Sec3_4_best.h5"}})
    )
    (root / "results" / "part1.json").write_text(json.dumps({"q1_3": {"student_id": STUDENT["student_id"]}}))
    sha = hashlib.sha256(b"model").hexdigest()
    record = {"key_parts": {"config": {"initial_weights": {"sha256": sha}}}}
    (root / "results" / "cache" / "grid" / "Part3_rho0.05.json").write_text(json.dumps(record))
    (root / "figures").mkdir()
    (root / "figures" / "network.png").write_bytes(b"png")
    for n in (1, 2, 3):
        notebook(
            root / f"Assignment01_Part{n}_solution.ipynb",
            [
                new_markdown_cell(
                    f"# Part {n}\n![network](figures/network.png) ![remote](https://example.org/a.png)"
                ),
                student_cell(STUDENT),
                executed(f"part = {n}" if n < 3 else "%matplotlib inline\nimport helpers", 1),
            ],
        )
    return root


def make_submission(root, *args):
    return run(["make", "-s", "--no-print-directory", "submission", *args], cwd=root)


def test_submission_zip_holds_what_the_assignment_asks_for(project, tmp_path):
    proc = make_submission(project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    archive = project / "424242_assignment01_solution.zip"
    kinds = ("solution.ipynb", "output.html")
    expected = {f"Assignment01_Part{n}_{kind}" for n in (1, 2, 3) for kind in kinds}
    expected |= {"models.py", "attacks.py", "helpers.py", "student.json", "requirements.txt"}
    expected |= {"results/part1.json", "results/part3.json", "results/cache/grid/Part3_rho0.05.json"}
    expected |= {"figures/network.png"}
    expected |= {"models/Part3_Sec3_4_best.h5", "models/grid/Part3_rho0.05.h5"}
    with zipfile.ZipFile(archive) as zf:
        assert set(zf.namelist()) == expected | {"README.md"}
        zf.extractall(tmp_path / "unzipped")
    for name in expected:
        assert (tmp_path / "unzipped" / name).read_bytes() == (project / name).read_bytes()
    assert f"{len(expected) + 1} files, " in proc.stdout


@pytest.mark.parametrize(
    "remove, named",
    [
        ("models/grid/Part3_rho0.05.h5", "models/grid/Part3_rho0.05.h5"),
        ("models/Part3_Sec3_4_best.h5", "models/Part3_Sec3_4_best.h5"),
        ("student.json", "student.json"),
        ("helpers.py", "helpers.py"),
    ],
    ids=["cache-entry-model", "reported-model", "student-file", "imported-module"],
)
def test_submission_refuses_a_file_the_notebooks_need(project, remove, named):
    (project / remove).unlink()
    proc = make_submission(project)
    assert proc.returncode != 0 and named in proc.stderr
    assert not list(project.glob("*.zip")) and not list(project.glob("*.html"))


def test_submission_refuses_a_cache_entry_whose_starting_model_is_gone(project):
    (project / "models" / "Part3_Sec3_4_best.h5").write_bytes(b"retrained")
    proc = make_submission(project)
    assert proc.returncode != 0 and "results/cache/grid/Part3_rho0.05.json was trained from" in proc.stderr
    assert not list(project.glob("*.zip"))


def test_submission_refuses_a_non_numeric_student_id(project):
    (project / "student.json").write_text(json.dumps({**STUDENT, "student_id": "s1234"}))
    proc = make_submission(project)
    assert proc.returncode != 0 and "student ID" in proc.stderr and "'s1234'" in proc.stderr
    assert not list(project.glob("*.zip"))


def test_export_refuses_a_notebook_whose_student_block_is_not_the_student_json_beside_it(project):
    nb = project / "Assignment01_Part2_solution.ipynb"
    assert export(nb).returncode == 0
    (project / "student.json").write_text(json.dumps({**STUDENT, "email": "mai@example.org"}))
    proc = export(nb)
    assert proc.returncode != 0
    assert "mai@example.org" in proc.stderr and "make student" in proc.stderr
    assert "--execute" not in proc.stderr  # executing would not change a Markdown cell


def test_submission_refuses_a_missing_part(project):
    (project / "Assignment01_Part3_solution.ipynb").unlink()
    proc = make_submission(project)
    assert proc.returncode != 0 and "Assignment01_Part3_solution.ipynb" in proc.stderr
    assert not list(project.glob("*.zip"))


def test_submission_refuses_an_image_outside_the_project(project):
    nb = project / "Assignment01_Part1_solution.ipynb"
    notebook(
        nb, [new_markdown_cell("![net](../shared/net.png)"), student_cell(STUDENT), executed("x = 1", 1)]
    )
    proc = make_submission(project)
    assert proc.returncode != 0 and "../shared/net.png" in proc.stderr
    assert not list(project.glob("*.zip"))


# --- README results table ------------------------------------------------------------------------


def test_results_table_is_rendered_from_the_json_files(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- results:start -->\nold\n<!-- results:end -->\n"
        "<!-- benchmark:start -->\nkept 1.23x\n<!-- benchmark:end -->\n"
    )
    (tmp_path / "part1.json").write_text(json.dumps({"q1_2": {"ce_loss": 1.234567}}))
    (tmp_path / "part2.json").write_text("{not json")
    (tmp_path / "part3.json").write_text(
        json.dumps({"attacks": {"clean": 0.7, "fgsm": 0.1, "pgd": 0.0, "mim": 0.01}})
    )
    script = [sys.executable, str(REPO_ROOT / "tools" / "render_readme.py"), "--readme", str(readme)]
    script += ["--results", str(tmp_path)]
    assert run(script).returncode == 0
    text = readme.read_text()
    assert "old" not in text and "| 1.2346 |" in text and "0.7000 / 0.1000 / 0.0000 / 0.0100" in text
    part2_rows = [line for line in text.splitlines() if line.startswith("| 2 |")]  # part2.json is unreadable
    assert part2_rows and all(line.endswith("| not yet run |") for line in part2_rows)
    assert "kept 1.23x" in text
    assert run(script).returncode == 0 and readme.read_text() == text
