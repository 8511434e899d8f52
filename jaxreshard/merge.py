"""The old home of `merge-lora` and `unify`; kept so `jaxreshard.merge.*` imports keep working.

LoRA merging lives in lora.py, unifying in unify.py.
"""

from .lora import adapter_reads as adapter_reads
from .lora import merge_lora as merge_lora
from .lora import plan_merge_lora as plan_merge_lora
from .unify import pick_by_suffix as pick_by_suffix
from .unify import plan_unify as plan_unify
from .unify import restrict as restrict
from .unify import unify as unify
from .unify import write_unified as write_unified
