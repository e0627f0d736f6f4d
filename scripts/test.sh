#!/bin/sh
# Runs every test: the C unit tests (spec/00-c), then the integration specs (spec/0[1-9]-*)
# with pytest against the real binary. Ends with the line "N passed, N failed".
#   BUILD=build-asan scripts/test.sh     run against another build (make asan does this)
#   scripts/test.sh -k keepalive         extra arguments go to pytest
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
PYTHON=${PYTHON:-/usr/bin/python3}
export MOONGATE_BIN="$PWD/$BUILD/moongate"
passed=0
failed=0

for t in "$BUILD"/tests/test_*; do
  [ -x "$t" ] || continue
  out=$("$t" 2>&1)
  rc=$?
  printf '%s\n' "$out"
  line=$(printf '%s\n' "$out" | grep -E '^[^ ]+: [0-9]+ passed, [0-9]+ failed$' | tail -n 1)
  if [ -z "$line" ]; then
    echo "$t: crashed or printed no summary (exit $rc)"
    failed=$((failed + 1))
    continue
  fi
  p=$(printf '%s\n' "$line" | sed -E 's/.*: ([0-9]+) passed.*/\1/')
  f=$(printf '%s\n' "$line" | sed -E 's/.* ([0-9]+) failed$/\1/')
  passed=$((passed + p))
  failed=$((failed + f))
  if [ "$rc" != 0 ] && [ "$f" = 0 ]; then failed=$((failed + 1)); fi
done

xml=$(mktemp /tmp/moongate-junit.XXXXXX)
"$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$xml" spec "$@"
rc=$?
if [ -s "$xml" ]; then
  counts=$("$PYTHON" - "$xml" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
t = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skip = sum(int(s.get("skipped", 0)) for s in suites)
print(t - bad - skip, bad)
PY
)
  passed=$((passed + ${counts% *}))
  failed=$((failed + ${counts#* }))
elif [ "$rc" != 5 ]; then
  failed=$((failed + 1))
fi
rm -f "$xml"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
