#!/usr/bin/env bash
# The end of CI (.ci/run): the environments after the newest, each by check.sh, then one line per environment
# (newest, colab, floor) saying PASSED, FAILED or SKIPPED and why, last in the log, where a reader looks: a CI run
# that is green with the Colab and floor environments never run says so at its end, not in the middle.
#     bash tests/environments/all.sh NEWEST_PYTEST_EXIT NEWEST_VERSIONS
# Exit 1 when any environment failed; a missing Python is SKIPPED (said in the list), not a failure.
set -uo pipefail
cd "$(dirname "$0")/../.."
newest_code=$1 newest_versions=$2
if [ "$newest_code" -eq 0 ]; then
    results=("environment newest: PASSED ($newest_versions)")
else
    results=("environment newest: FAILED (pytest exit $newest_code) ($newest_versions)")
fi
status=$((newest_code != 0))
for env in "colab 3.13 600" "floor 3.11 600"; do
    set -- $env
    result=""
    # check.sh's output passed on as it comes; its result line (the last PASSED/FAILED/SKIPPED of this name) is kept.
    while IFS= read -r line; do
        printf '%s\n' "$line"
        case $line in "environment $1: PASSED"* | "environment $1: FAILED"* | "environment $1: SKIPPED"*) result=$line;; esac
    done < <(bash tests/environments/check.sh "$1" "$2" "$3" 2>&1)
    wait $!
    code=$?
    [ -n "$result" ] || result="environment $1: FAILED: check.sh exited $code without a result line (its output is above)"
    [ "$code" -eq 0 ] || [ "$code" -eq 3 ] || status=1
    results+=("$result")
done
echo
echo "=== every environment: PASSED, FAILED, or SKIPPED (a SKIPPED one was not run: this CI run checked less than the README names) ==="
printf '%s\n' "${results[@]}"
exit "$status"
