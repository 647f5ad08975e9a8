#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine with Python 3.11:
# Fashion-MNIST from Debian's package, then the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q dataset-fashion-mnist
fi
# The same versions a cluster node installs (infra/constraints.txt), so the tests run what ships.
python3 -m pip install -q -c infra/constraints.txt -e ".[test,bench]"
