"""Write scikit-learn's handwritten digits (1,797 8x8 images, shipped inside
scikit-learn, no download) as train.npz / test.npz for `source: npz`: a small-data
classification set that no shipped recipe was tuned on.

    python benchmarks/small_data/make_digits.py runs/digits_data

Split, seeded and stratified per class: 2/3 train (1,201 images, of which the
recipe's val_fraction carves the validation part), 1/3 test (596). Pixels 0..16 are
stored as float32 in [0, 1], shape (N, 1, 8, 8).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(args.seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test[members[: len(members) // 3]] = True
    args.folder.mkdir(parents=True, exist_ok=True)
    np.savez(args.folder / "train.npz", x=x[~test], y=y[~test])
    np.savez(args.folder / "test.npz", x=x[test], y=y[test])
    print(f"{args.folder}: {int((~test).sum())} train, {int(test.sum())} test images")


if __name__ == "__main__":
    main()
