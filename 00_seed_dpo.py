"""Iteration 0 of SAIL: DiffusionDPO from the base model on the human seed pairs.

This is 04_train.py with the base model as start and reference and seed/pairs.jsonl as data
(one training loop in the kit): the process becomes `04_train.py ... --iter 0` (os.execv: the same
process and environment, so `accelerate launch 00_seed_dpo.py` works). Every 04_train.py flag works here too.

Commands:
    python 00_seed_dpo.py --run runs/toy --preset toy
is short for
    python 04_train.py --init toy --pairs runs/toy/seed/pairs.jsonl --out runs/toy/iter_00/ckpt --iter 0
With a TensorBoard log and validation images every 100 steps (docs/training.md):
    python 00_seed_dpo.py --run runs/toy --preset toy --report-to tensorboard --validation-every 100

Reads:  runs/<run>/seed/pairs.jsonl and its images (from toy.data, tools/prepare_pickapic.py,
        or any pair file in the kit's format), the preset's base model.
Writes: runs/<run>/iter_00/ckpt/ (unet/, sail.json, train_log.jsonl), iter_00/train.args.json,
        iter_00/log.txt; with --report-to, iter_00/tracker/; with --validation-every, iter_00/validation/.
"""
import os
import sys
from pathlib import Path

TRAIN = Path(__file__).resolve().with_name("04_train.py")


def main(args):
    """Become 04_train.py with these command-line arguments and --iter 0 (given last, so it wins)."""
    if {"-h", "--help"} & set(args):
        print(__doc__ + "\nThe flags are 04_train.py's:\n", flush=True)
    interpreter = sys.orig_argv[:len(sys.orig_argv) - len(sys.argv)]  # python and its own options (-u, -X ...)
    os.execv(sys.executable, [*interpreter, str(TRAIN), *args, "--iter", "0"])


if __name__ == "__main__":
    main(sys.argv[1:])
