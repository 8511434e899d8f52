#!/usr/bin/env python3
"""Drop-in for MindFormers' transform_ckpt_lora.py: fold every LoRA branch into its base weight and write
<dst_ckpt_dir>/merged_lora.<ckpt|safetensors> (see jaxreshard/mindformers/compat.py and the README for the
differences)."""

import argparse
import sys

from jaxreshard.mindformers.compat import transform_ckpt_lora

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--src_ckpt_strategy", default=None, help="strategy file or folder of a distributed source")
p.add_argument("--src_ckpt_path_or_dir", required=True, help="complete .ckpt/.safetensors or folder of rank_<n>/")
p.add_argument("--dst_ckpt_dir", required=True)
p.add_argument("--prefix", default="checkpoint_")
p.add_argument("--lora_scaling", type=float, default=None, help="lora_alpha / r (required: no silent default)")
p.add_argument("--save_format", choices=["ckpt", "safetensors"], default="ckpt")
p.add_argument("--overwrite", action="store_true", help="replace an existing merged_lora file")
a = p.parse_args()
sys.exit(transform_ckpt_lora(a.src_ckpt_path_or_dir, a.src_ckpt_strategy, a.dst_ckpt_dir, a.prefix, a.lora_scaling,
                             a.save_format, a.overwrite))
