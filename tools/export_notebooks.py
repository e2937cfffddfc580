"""Check notebooks and export those that pass to HTML (export_html.sh calls it).

    python tools/export_notebooks.py NOTEBOOK.ipynb ...

X_solution.ipynb becomes X_output.html next to it. A notebook with a code cell that never ran, cells run
out of order, or an error output is refused (named on stderr with its first problems) and not exported, as
is a notebook beside a student.json whose Student Information block does not show exactly that file (or
that file is bad; see tools/personalise.py); the exit status is 1 when any notebook was refused or missing.
In the HTML, a cell tagged `remove_input` shows its output only, and a cell tagged `remove_cell` is left
out, as is papermill's `injected-parameters` cell (the `parameters` cell above it already shows the
settings a reader can change). The HTML carries a print style (PRINT_CSS) so that a notebook printed to A4
shows every character of its code and text, and its math as MathML, converted from the LaTeX at export
(`tex_to_mathml`): it needs no MathJax and no network, so a report opened or printed offline shows formulas,
not `$...$` source.
"""

import json
import os
import re
import sys
from html import escape, unescape
from pathlib import Path

from personalise import block_problem, read_student


def problems(path):
    """One line per code cell that never ran, ran out of order, or shows an error."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    found, last = [], 0
    for number, cell in enumerate(cells, 1):
        source = "".join(cell.get("source", ""))
        if cell["cell_type"] != "code" or not source.strip():
            continue
        where = f"cell {number} ({source.strip().splitlines()[0][:60]!r})"
        count = cell.get("execution_count")
        if count is None:
            found.append(f"{where} was not executed")
        elif count <= last:
            found.append(f"{where} ran out of order (execution count {count} after {last})")
        else:
            last = count
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"{where} has an error output: {out.get('ename')}: {out.get('evalue')}")
    return found


def student_problems(path):
    """One line if the notebook ``path`` does not show the student.json beside it (or that file is bad);
    nothing where there is no student.json beside it (a notebook outside a project)."""
    student_file = path.parent / "student.json"
    if not student_file.is_file():
        return []
    try:
        student = read_student(student_file)
    except ValueError as error:
        return [str(error)]
    problem = block_problem(path, student)
    return [problem] if problem else []


# Printed to A4 (a marker's print or "Save as PDF"), JupyterLab's style cuts code lines off at about 83
# characters and moves a long text output whole to the next page, leaving the rest of the page blank. Here:
# code and text at 10 px (a 120-character line fits the width, a longer one wraps instead of being cut),
# narrower prompts, text outputs and tables free to continue on the next page; a figure stays whole. The page
# is A4, the course's paper, whatever the browser's default (headless Chromium's is Letter).
PRINT_CSS = """
@page { size: A4; }
@media print {
  :root { --jp-code-font-size: 10px; --jp-cell-prompt-width: 40px; }
  .jp-InputPrompt, .jp-OutputPrompt { font-size: 8px; }
  .jp-RenderedHTMLCommon pre { font-size: 10px; }
  .jp-InputArea-editor pre, .jp-RenderedText pre { white-space: pre-wrap; overflow-wrap: anywhere; }
  .jp-OutputArea-child { break-inside: auto; }
  .jp-RenderedImage { break-inside: avoid; }
  .jp-RenderedHTMLCommon table { font-size: 11px; }
  .jp-RenderedHTMLCommon td, .jp-RenderedHTMLCommon th { padding: 2px 6px; line-height: 1.25; }
}
"""


def with_print_style(html):
    """`html` with PRINT_CSS as the last style of its head (so that it overrides the theme's)."""
    if "</head>" not in html:
        raise ValueError("no </head> in the exported HTML: cannot add the print style")
    return html.replace("</head>", f"<style>{PRINT_CSS}</style>\n</head>", 1)


# Commands the notebooks' LaTeX uses that latex2mathml does not know, spelled with ones it knows.
TEX_SPELLINGS = {r"\arg": r"\mathrm{arg}\,"}
UNKNOWN_COMMAND = re.compile(r"\\[A-Za-z]+")
MATHML = "http://www.w3.org/1998/Math/MathML"


def tex_to_mathml(tex, display=False):
    """The MathML of one LaTeX formula (``tex`` without its ``$`` delimiters; ``display``: a ``$$`` block).

    A formula latex2mathml cannot convert, or converts leaving a command unknown to it in the text, is shown
    as its LaTeX source in a ``<code class="tex-source">`` (visibly not typeset, never as ``$...$``), with a
    warning on stderr that names it."""
    from latex2mathml.converter import convert

    spelled = re.sub(
        "|".join(re.escape(command) + r"(?![A-Za-z])" for command in TEX_SPELLINGS),
        lambda m: TEX_SPELLINGS[m.group()],
        tex,
    )
    try:
        # HTML needs no namespace on <math>, and nbconvert's heading anchors would spell one as ns0:math
        mathml = convert(spelled, display="block" if display else "inline").replace(f' xmlns="{MATHML}"', "")
    except Exception as error:  # latex2mathml raises its own exceptions and plain ones alike
        problem = f"{type(error).__name__}: {error}"
    else:
        unknown = UNKNOWN_COMMAND.search(unescape(re.sub(r"<[^>]*>", "", mathml)))
        if unknown is None:
            return mathml
        problem = f"unknown command {unknown.group()}"
    print(f"warning: formula left as LaTeX source ({problem}): {tex!r}", file=sys.stderr)
    return f'<code class="tex-source">{escape(tex)}</code>'


def html_exporter():
    """nbconvert's HTML exporter (lab template) with the cell tags `remove_input`, `remove_cell` and
    papermill's `injected-parameters` honoured, math converted to MathML (in Markdown cells and in the
    Markdown that code cells display) and no MathJax script."""
    from jinja2 import DictLoader, pass_context
    from nbconvert import HTMLExporter
    from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath
    from nbconvert.preprocessors import TagRemovePreprocessor

    class MathMLRenderer(IPythonRenderer):
        """nbconvert's Markdown renderer, with each formula its math parser found (never one inside code, nor
        an escaped ``\\$``) given as MathML instead of as LaTeX for MathJax."""

        def inline_math(self, body):
            return tex_to_mathml(body)

        def block_math(self, body):
            return tex_to_mathml(body, display=True)

        def latex_environment(self, name, body):
            return tex_to_mathml(f"\\begin{{{name}}}{body}\\end{{{name}}}", display=True)

    class OfflineHTMLExporter(HTMLExporter):
        @pass_context
        def markdown2html(self, context, source):
            """HTMLExporter.markdown2html (the filter every Markdown cell and text/markdown output goes
            through), with MathMLRenderer."""
            cell = context.get("cell", {})
            renderer = MathMLRenderer(
                escape=False,
                attachments=cell.get("attachments", {}),
                embed_images=self.embed_images,
                path=context.get("resources", {}).get("metadata", {}).get("path", ""),
                anchor_link_text=self.anchor_link_text,
                exclude_anchor_links=self.exclude_anchor_links,
                **self.lexer_options,
            )
            return MarkdownWithMath(renderer=renderer).render(source)

    without_mathjax = (
        "{%- extends 'index.html.j2' -%}\n"
        "{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}\n"
    )
    exporter = OfflineHTMLExporter(
        template_name="lab",
        template_file="offline.html.j2",
        extra_loaders=[DictLoader({"offline.html.j2": without_mathjax})],
    )
    tags = TagRemovePreprocessor(
        remove_input_tags={"remove_input"},
        remove_cell_tags={"remove_cell", "injected-parameters"},
        enabled=True,
    )
    exporter.register_preprocessor(tags, enabled=True)
    return exporter


def export(path, exporter):
    """Write `path`'s HTML next to it, atomically (temporary file, then rename); return the HTML's path."""
    import nbformat

    body, _ = exporter.from_notebook_node(nbformat.read(path, as_version=4))
    html = path.with_name(path.stem.removesuffix("_solution") + "_output.html")
    partial = html.with_name(html.name + ".partial")
    partial.write_text(with_print_style(body), encoding="utf-8")
    os.replace(partial, html)
    return html


def main(paths):
    status, exporter = 0, None
    for path in map(Path, paths):
        if not path.is_file():
            print(f"error: no notebook {path}", file=sys.stderr)
            status = 1
            continue
        found, student = problems(path), student_problems(path)
        if found or student:
            more = [f"... and {len(found) - 5} more"] if len(found) > 5 else []
            print(f"refusing to export {path}:", *student, *found[:5], *more, file=sys.stderr, sep="\n  ")
            if found:
                print(f"  (execute it top to bottom: ./export_html.sh --execute {path})", file=sys.stderr)
            status = 1
            continue
        if exporter is None:  # nbconvert is slow to import: only when there is something to export
            exporter = html_exporter()
        print(f"exported {export(path, exporter)}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
