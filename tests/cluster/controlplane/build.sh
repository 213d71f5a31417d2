#!/usr/bin/env bash
# Build the test control plane once per machine into a cache outside the repository and
# print the folder that holds the binaries. Everything comes through go.mod and the Go
# module proxy: no git clones, no release downloads.
#
#   KUBETUNE_CACHE (default ~/.cache/kubetune)/controlplane/<versions>-<hash>/
#     etcd kube-apiserver kube-controller-manager kube-scheduler kwok
#     gateway-api/*.yaml   (Gateway API CRDs from the sigs.k8s.io/gateway-api module)
#
# The folder's name is keyed by the pinned versions, the Go version and a hash of the
# module files, so a bump builds anew and an unchanged checkout takes a second.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
# shellcheck source=versions.env
source versions.env
export GOFLAGS=-mod=mod GOTOOLCHAIN=local

go_version="$(go env GOVERSION)"
key="$(cat versions.env go.mod go.sum cmd/etcd/main.go build.sh | sha256sum | cut -c1-12)"
cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/controlplane"
out="$cache/k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_${go_version}_${key}"
if [[ -f "$out/.complete" ]]; then
    echo "$out"
    exit 0
fi

tmp="$out.partial.$$"
rm -rf "$tmp"
mkdir -p "$tmp/gateway-api"
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS

minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
ver_flags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ver_flags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ver_flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

echo "building the control plane ($KUBERNETES_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION) into $out" >&2
go build -trimpath -ldflags "-s -w $ver_flags" -o "$tmp/" \
    ./cmd/etcd \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    sigs.k8s.io/kwok/cmd/kwok

# The Gateway API CRDs (standard channel), from the module's own files.
gw_dir="$(cd /tmp && GOFLAGS= GO111MODULE=on go mod download -json "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
cp "$gw_dir"/config/crd/standard/*.yaml "$tmp/gateway-api/"
chmod u+w "$tmp/gateway-api/"*.yaml

printf 'seconds=%s\n' "$((SECONDS - start))" > "$tmp/.complete"
du -sb "$tmp" | awk '{print "bytes=" $1}' >> "$tmp/.complete"
trap - EXIT
rm -rf "$out"
mv "$tmp" "$out"
echo "built in $((SECONDS - start)) s" >&2
echo "$out"
