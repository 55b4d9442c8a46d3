#!/usr/bin/env bash
# One more environment users run: a fresh venv of the given Python with tests/environments/NAME.txt as pip
# constraints, then the tests marked `versions` (what differs between versions: a grouped-query-attention Llama
# through tier 3, fp8-emulated, compile, FSDP2, the device seam, notebooks under papermill), within a time budget.
#     bash tests/environments/check.sh NAME PYTHON_VERSION BUDGET_SECONDS
# Prints the versions it got and one result line; exit 0 passed, 1 failed or over budget, 3 skipped (no such Python).
set -uo pipefail
cd "$(dirname "$0")/../.."
name=$1 want=$2 budget=$3
# Python $want: under pyenv (this machine keeps 3.10-3.13 there), else on PATH (a pyenv shim of an inactive
# version is on PATH but does not run: hence the check); none: skipped, and said so.
python=$(ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/"$want".*/bin/python 2>/dev/null | tail -n 1)
[ -n "$python" ] || python=$(command -v "python$want" || true)
if [ -z "$python" ] || ! "$python" -c "pass" 2>/dev/null; then
    echo "environment $name: SKIPPED: no Python $want here (pyenv install $want, or put python$want on PATH)"
    exit 3
fi
venv="${TMPDIR:-/tmp}/suite-venv-$name"  # outside the checkout: tests copy the tree
started=$SECONDS
"$python" -m venv --clear "$venv"
if ! "$venv/bin/pip" install -q -c "tests/environments/$name.txt" -r requirements.txt -r tests/requirements-ci.txt; then
    echo "environment $name: FAILED: pip could not install the constraints of tests/environments/$name.txt"
    exit 1
fi
versions=$("$venv/bin/python" -c "import platform, torch, numpy; import importlib.metadata as m
def v(p):
    try: return m.version(p)
    except m.PackageNotFoundError: return 'absent'
print(f'Python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, '
      + ', '.join(f'{p} {v(p)}' for p in ('transformers', 'torchao', 'papermill', 'nbval')))")
echo "environment $name: $versions (installed in $((SECONDS - started)) s)"
left=$((budget - (SECONDS - started)))
if [ "$left" -lt 60 ]; then
    echo "environment $name: FAILED: the install took $((SECONDS - started)) s of its $budget s budget"
    exit 1
fi
timeout "$left" "$venv/bin/python" -m pytest -q -rs -m versions -p no:cacheprovider -o addopts="" tests 2>&1 | tail -n 25
code=${PIPESTATUS[0]}
case $code in
    0) echo "environment $name: PASSED in $((SECONDS - started)) s ($versions)";;
    124) echo "environment $name: FAILED: over its budget of $budget s";;
    *) echo "environment $name: FAILED (pytest exit $code) in $((SECONDS - started)) s ($versions)";;
esac
[ "$code" -eq 0 ]
