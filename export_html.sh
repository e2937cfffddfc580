#!/usr/bin/env bash
# Export notebooks to HTML for the submission: X_solution.ipynb -> X_output.html, next to the notebook.
#
#   ./export_html.sh [--execute] [NOTEBOOK.ipynb ...]
#
# Without notebook arguments: the three parts, Assignment01_Part{1,2,3}_solution.ipynb; a part not written
# yet is skipped with a message. By default nothing is re-executed: the HTML shows the outputs saved in the
# notebook. --execute first runs each notebook top to bottom in the full profile with papermill and, only
# when that succeeds, replaces the notebook with the executed one. Executing reuses every cached training and
# evaluation whose key still matches; FRESH=evaluations (in the environment) recomputes every evaluation, and
# FRESH=all retrains every model too (passed to the notebooks that have a FRESH parameter).
#
# A notebook with a code cell that never ran, with cells run out of order, or with an error output is
# refused (exit status 1, naming the notebook and the cell), so a broken notebook is never exported.
# The Python used is $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi

execute=0
case "${FRESH:-}" in
    ""|evaluations|all) ;;
    *) echo "export_html.sh: FRESH='$FRESH'; allowed: '' (reuse), 'evaluations', 'all'" >&2; exit 2 ;;
esac
notebooks=()
for arg in "$@"; do
    case "$arg" in
        --execute) execute=1 ;;
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) echo "export_html.sh: unknown option $arg" >&2; exit 2 ;;
        *) notebooks+=("$arg") ;;
    esac
done
if [ ${#notebooks[@]} -eq 0 ]; then
    for n in 1 2 3; do
        nb="$ROOT/Assignment01_Part${n}_solution.ipynb"
        if [ -f "$nb" ]; then notebooks+=("$nb"); else echo "skipping $(basename "$nb"): not written yet"; fi
    done
fi

status=0
if [ "$execute" = 1 ]; then
    mkdir -p "$ROOT/runs/full"
    ready=()
    for nb in "${notebooks[@]}"; do
        executed="$ROOT/runs/full/$(basename "$nb")"
        echo "executing $nb in the full profile"
        fresh=()
        if [ -n "${FRESH:-}" ] && grep -q '"FRESH = ' "$nb"; then fresh=(-p FRESH "$FRESH"); fi
        if [ -f "$nb" ] && "$PYTHON" -m papermill "$nb" "$executed" -p PROFILE full "${fresh[@]}" -k python3 --cwd "$ROOT"; then
            mv "$executed" "$nb"
            ready+=("$nb")
        else
            echo "error: executing $nb failed; the notebook is left as it was (the failed run: $executed)" >&2
            status=1
        fi
    done
    notebooks=("${ready[@]}")
fi
[ ${#notebooks[@]} -gt 0 ] || exit $status

# Check every notebook, export those that pass (one interpreter for all of them; cells tagged
# remove_input show only their output, cells tagged remove_cell are left out).
"$PYTHON" "$ROOT/tools/export_notebooks.py" "${notebooks[@]}" || status=1
exit $status
