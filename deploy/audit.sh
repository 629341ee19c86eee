#!/usr/bin/env bash
# Audits the hash-pinned locks (requirements/) against a vulnerability service: PyPI's by
# default, `bash deploy/audit.sh -s osv` for OSV. Exits non-zero on any known vulnerability and,
# through --strict, on any locked package the service could not look up, so an audit that
# reached no service cannot pass. Needs network access to the service (this project's machines
# have none: .github/workflows/audit.yml runs it on hosted CI). Extra arguments go to pip-audit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

status=0
for lock in requirements/lock-runtime.txt requirements/lock-dev.txt requirements/lock-langfuse.txt requirements/lock-pip.txt; do
  # torch is locked as its CPU build (2.13.0+cpu); the services know it by the public release it
  # is built from. The hashes stay: pip-audit checks every line has one, and downloads nothing.
  sed -E 's/^(torch==[^+ ]+)\+cpu /\1 /' "$lock" > "$tmp/$(basename "$lock")"
  echo "== $lock"
  "$PYTHON" -m pip_audit --require-hashes --disable-pip --strict --progress-spinner off \
    -r "$tmp/$(basename "$lock")" "$@" || status=1
done
exit "$status"
