#!/usr/bin/env bash
# Make `keras.datasets.fashion_mnist.load_data()` work without a download.
#
# Keras looks for the four original files in $KERAS_HOME/datasets/fashion-mnist/ (KERAS_HOME defaults
# to ~/.keras) before it downloads them. This script fills that folder:
#   1. the four files are already there: nothing to do;
#   2. otherwise install Debian's package `dataset-fashion-mnist` (as root, or through sudo) and link
#      its four .gz files into the folder;
#   3. otherwise stop with a message that says what to do by hand.
# Idempotent: a second run does nothing.
set -euo pipefail

FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
PACKAGE=dataset-fashion-mnist
CACHE="${KERAS_HOME:-$HOME/.keras}/datasets/fashion-mnist"

cache_complete() {
    local f
    for f in "${FILES[@]}"; do
        [ -s "$CACHE/$f" ] || return 1
    done
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 1
    fi
}

install_package() {
    dpkg -s "$PACKAGE" >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || return 1
    echo "Installing the Debian package $PACKAGE ..."
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$PACKAGE" \
        || { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$PACKAGE"; }
}

link_package_files() {
    local f src
    mkdir -p "$CACHE"
    for f in "${FILES[@]}"; do
        src=$(dpkg -L "$PACKAGE" 2>/dev/null | grep "/$f\$" | head -n 1) || return 1
        [ -s "$src" ] || return 1
        ln -sfn "$src" "$CACHE/$f"
    done
}

if cache_complete; then
    echo "Fashion-MNIST: the four files are in $CACHE"
    exit 0
fi

if install_package && link_package_files && cache_complete; then
    echo "Fashion-MNIST: linked the files of the Debian package $PACKAGE into $CACHE"
    exit 0
fi

cat >&2 <<EOF
Fashion-MNIST could not be provisioned: $CACHE does not hold the four files
  ${FILES[*]}
and the Debian package $PACKAGE could not be installed (no apt-get, no root or sudo, or no network).
Do one of these, then run the command again:
  - install the package: sudo apt-get install $PACKAGE   (the files land in /usr/share/datasets/fashion-mnist/;
    this script links them), or
  - download the four files from https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)
    into $CACHE/
EOF
exit 1
