"""Caps on the sizes a layout, strategy or job file may ask for, checked before anything is allocated.

Each cap is far above real use and low enough that the largest accepted value still plans in seconds (a mesh of
16384 devices plans the example Llama in about 4 s): a hostile or mistyped value is refused at once with a
message stating the cap instead of hanging or exhausting memory.
"""

from __future__ import annotations

MAX_RANKS = 16384  # devices per stage x pipeline stages, of a layout, a strategy or a --ranks list
MAX_MESH_AXES = 32  # axes of a native mesh, entries of a MindSpore device matrix
MAX_NAME_CHARS = 512  # a parameter name matched against layout rules (keeps every regex match fast)
MAX_PATTERN_CHARS = 1024  # a layout rule's `match` regex
MAX_UNBOUNDED_REPEATS = 3  # unbounded repeats (*, +, {n,}) in one `match` regex
MAX_BOUNDED_CHOICES = 4096  # ways the bounded repeats and alternations of one `match` regex can split a name
MAX_YAML_BYTES = 256 * 2**10  # a job or layout YAML file
MAX_YAML_NODES = 100_000  # YAML nodes of a document, each alias counted as the whole node it stands for
MAX_YAML_DEPTH = 64  # nesting of YAML collections
MAX_STRATEGY_BYTES = 64 * 2**20  # one MindSpore strategy file (real ones are a few MB)
MAX_PROCESSES = 1024  # --process-num and --num-processes
MAX_TENSOR_MAP = 64  # entries of a MindSpore tensor_map (one per tensor dim)
