#!/bin/sh
# Build the relay's image from this checkout: deploy/container/build.sh [BUILD OPTIONS...]
#
# 1. On this host, where pip reaches the package index: splicerelay's wheel, and binary
#    wheels of its dependencies for the image's Python (PYTHON_VERSION) and this machine's
#    architecture, into a temporary directory.
# 2. `$ENGINE build` with that directory as the context and no network: the Containerfile
#    installs those wheels and nothing else.
#
# Environment:
#   ENGINE          podman (default), docker or buildah
#   IMAGE           the name to tag, default localhost/splicerelay:VERSION
#   PYTHON          the Python that runs pip here, default python3
#   PYTHON_VERSION  the image's Python, default 3.11 (that of the default BASE)
# Options after the script name go to the build, after this script's own, e.g.
#   --build-arg BASE=localhost/debian-python:bookworm
# (`buildah bud --isolation chroot` refuses --network=none: add --network=host then.)
set -eu
cd "$(dirname "$0")/../.."

ENGINE=${ENGINE:-podman}
PYTHON=${PYTHON:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT

# Why a copy of the source: pip builds a local directory in place, and would leave
# build/ and *.egg-info in the checkout.
mkdir "$context/source"
tar -c --exclude='./.*' --exclude=./build --exclude=./dist --exclude=./tests \
    --exclude='*.egg-info' --exclude=__pycache__ . |
    tar -x -C "$context/source"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$context" "$context/source"
rm -rf "$context/source"
wheel=$(ls "$context"/splicerelay-*.whl)

# The dependencies as wheels for the image, not for this host: the image's Python may
# differ from the one here, and a wheel with compiled code (pyyaml) must match it.
abi=cp$(echo "$PYTHON_VERSION" | tr -d .)
"$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$context" \
    --python-version "$PYTHON_VERSION" --implementation cp --abi "$abi" \
    --platform "manylinux2014_$(uname -m)" "$wheel"

version=${wheel##*/splicerelay-}
version=${version%%-*}
IMAGE=${IMAGE:-localhost/splicerelay:$version}

case "$ENGINE" in
    buildah) build="bud" ;;
    *) build="build" ;;
esac
"$ENGINE" "$build" --network=none --file "$PWD/deploy/container/Containerfile" \
    --tag "$IMAGE" "$@" "$context"
echo "built $IMAGE"
