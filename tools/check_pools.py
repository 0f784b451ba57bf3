"""The prompt-pool check run_all.sh makes before a run starts: the prompt pools of a run must share no
prompt with each other, with the seed pairs or with the run's evaluation prompts.

Command:
    python -m tools.check_pools runs/toy

Reads:  runs/<run>/pools/iter_*.jsonl, seed/pairs.jsonl, eval/prompts.jsonl.
Writes: nothing; prints the sets and their sizes, or stops (exit 2) naming the overlap.
"""
import argparse
from pathlib import Path

from sail.common import SailError, run_stage
from sail.files import check_pools_disjoint


def main(args):
    if not Path(args.run).is_dir():
        raise SailError(f"{args.run}: no such run folder")
    sets = check_pools_disjoint(args.run)
    print(f"prompt sets disjoint: {', '.join(f'{Path(k).name} ({len(v)})' for k, v in sets.items())}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="run folder")
    return p


if __name__ == "__main__":
    run_stage(main, build_parser().parse_args())
