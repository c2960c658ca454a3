#!/usr/bin/env bash
# Run C test programs: exit 0 pass, 1 fail, 77 skip.  Prints one line per program and a closing summary.
set -u
pass=0; fail=0; skip=0
for bin in "$@"; do
    "$bin"; rc=$?
    case $rc in
        0) pass=$((pass + 1)); echo "PASS $bin" ;;
        77) skip=$((skip + 1)); echo "SKIP $bin" ;;
        *) fail=$((fail + 1)); echo "FAIL $bin (exit $rc)" ;;
    esac
done
echo "c-tests: $pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ]
