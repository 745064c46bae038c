#!/usr/bin/env bash
# Install kdistill into .venv and run the demo recipe: teacher, student alone and
# distilled student on MNIST, then print the comparison table.
source "$(dirname "$0")/setup.sh"
.venv/bin/kdistill run recipes/mnist_quick.yaml --output-dir runs/mnist_quick --overwrite "$@"
