#!/usr/bin/env python3
"""Drop-in for MindFormers' tools/ckpt_transform/transform_checkpoint.py, same arguments, same output layout
(<dst>/<stem>/rank_<r>/<prefix><r>.ckpt), without its bugs (see jaxreshard/mindformers/compat.py and the README)."""

import argparse
import sys

from jaxreshard.mindformers.compat import parse_bool, transform_checkpoint

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--src_checkpoint", required=True, help="complete .ckpt, folder of .ckpt files, or folder of rank_<n>/")
p.add_argument("--dst_checkpoint_dir", "--dst_checkpoint", default="",
               help="output root (default ./transformed_checkpoint)")
p.add_argument("--src_strategy", default=None, help="source strategy file or folder (None: complete source)")
p.add_argument("--dst_strategy", default=None, help="destination strategy file or folder (None: complete output)")
p.add_argument("--prefix", default="checkpoint_")
p.add_argument("--rank_id", type=int, default=None, help="this process's rank (multi-process mode)")
p.add_argument("--world_size", type=int, default=None, help="destination rank count (checked against the strategy)")
p.add_argument("--transform_process_num", "--process_num", type=int, default=1, dest="process_num")
p.add_argument("--transform_by_rank", type=parse_bool, default=False, help="accepted; each rank is always written once")
p.add_argument("--overwrite", action="store_true", help="replace existing rank folders (never implied)")
a = p.parse_args()
sys.exit(transform_checkpoint(a.src_checkpoint, a.dst_checkpoint_dir, a.src_strategy, a.dst_strategy, a.prefix,
                              a.rank_id, a.world_size, a.process_num, a.overwrite))
