"""Iteration 0 of SAIL: DiffusionDPO from the base model on the human seed pairs.

This is 04_train.py with the base model as start and reference and seed/pairs.jsonl as data
(one training loop in the kit). Every 04_train.py flag works here too.

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
import importlib

from sail import common

train = importlib.import_module("04_train")  # a stage file: its name starts with a digit


def build_parser():
    parser = train.build_parser()
    parser.description = __doc__
    return parser


def main(args):
    args.iter = 0
    train.locked_main(args)


if __name__ == "__main__":
    common.run_stage(main, build_parser().parse_args())
