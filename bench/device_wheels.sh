#!/bin/bash
# Download, here, the packages cryopool's engine imports that the GPU machine's image lacks (its python3 is 3.12
# with torch, numpy, scipy, msgpack; see ../.library/device/KINDS.md) into .whl/ (ignored by git), for
# bench/device_check.sh. Nothing is fetched on the GPU machine.
set -e
cd "$(dirname "$0")/.."
mkdir -p .whl
P="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d .whl \
    blake3 gemmi zstandard
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl mrcfile
# py-spy: where the time of the refinement on CUDA goes (a Python-level profile; the image has no profiler for it)
python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_5_x86_64 -d .whl py-spy
ls -la .whl
