"""Iteration 0 of SAIL: DiffusionDPO from the base model on the human seed pairs.

This is 04_train.py with the base model as start and reference and seed/pairs.jsonl as data
(one training loop in the kit). Every 04_train.py flag works here too.

Command:
    python 00_seed_dpo.py --run runs/toy --preset toy
is short for
    python 04_train.py --init toy --pairs runs/toy/seed/pairs.jsonl --out runs/toy/iter_00/ckpt --iter 0

Reads:  runs/<run>/seed/pairs.jsonl and its images (from toy_world.py data, prepare_pickapic.py,
        or any pair file in the kit's format), the preset's base model.
Writes: runs/<run>/iter_00/ckpt/ (unet/, sail.json, train_log.jsonl), iter_00/train.args.json,
        iter_00/log.txt.
"""
import importlib.util
from pathlib import Path

import sail_common as sc

_spec = importlib.util.spec_from_file_location("train_stage", Path(__file__).with_name("04_train.py"))
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)


def main(args):
    args.iter = 0
    train.locked_main(args)


if __name__ == "__main__":
    parser = train.build_parser()
    parser.description = __doc__
    sc.run_stage(main, parser.parse_args())
