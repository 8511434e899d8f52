#!/usr/bin/env python3
"""Drop-in for MindFormers' toolkit/safetensors/unified_safetensors.py: merge distributed safetensors into
MindSpore's unified layout under <output_dir>/<file_suffix>_ckpt_convert/unified_safe/ (see the README)."""

import argparse
import sys

from jaxreshard.mindformers.compat import parse_bool, unified_safetensors

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--src_strategy_dirs", default=None, help="strategy file or folder (merged in memory, never written)")
p.add_argument("--mindspore_ckpt_dir", required=True, help="folder of rank_<n>/")
p.add_argument("--output_dir", required=True)
p.add_argument("--file_suffix", default="1_1", help="take *<suffix>.safetensors in each rank folder ('None': the last)")
p.add_argument("--has_redundancy", type=parse_bool, default=None, help="checked against the files' metadata")
p.add_argument("--filter_out_param_prefix", nargs="*", default=[], help="drop these parameters everywhere")
p.add_argument("--max_process_num", type=int, default=64)
p.add_argument("--format", default="safetensors", help="accepted for compatibility; unused")
p.add_argument("--overwrite", action="store_true", help="replace an existing unified_safe folder")
a = p.parse_args()
sys.exit(unified_safetensors(a.src_strategy_dirs, a.mindspore_ckpt_dir, a.output_dir,
                             None if a.file_suffix in ("None", "") else a.file_suffix, a.has_redundancy,
                             a.filter_out_param_prefix, a.max_process_num, a.overwrite))
