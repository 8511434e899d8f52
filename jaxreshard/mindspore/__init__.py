"""The MindSpore wing: MindSpore's strategy semantics and `transform_checkpoints` orchestration on top of the
native planner.

The bytes of `.ckpt` and strategy files are ground-floor codecs in `jaxreshard.formats` (`mindspore_ckpt`,
`mindspore_ckpt_write`, `mindspore_strategy`, `mindspore_strategy_write`): the format registry, `verify` and the
writers need them without knowing any MindSpore semantics, and formats import nothing above them. This package
adds what those files mean:
- `strategy`: a strategy's parameters expanded into mesh + PartitionSpec layouts (and back, to write strategies);
- `ranklist`: MindSpore's `rank_list_for_transform` (which source ranks a destination rank loads);
- `planner`: `plan_mindspore`, the plan whose output files equal `transform_checkpoints`'s byte for byte.
"""

from .planner import plan_mindspore as plan_mindspore
from .planner import uses_by_stage_path as uses_by_stage_path
from .ranklist import rank_list_for_transform as rank_list_for_transform
from .strategy import StrategyLayout as StrategyLayout
from .strategy import param_layout as param_layout
from .strategy import strategies_by_stage as strategies_by_stage
