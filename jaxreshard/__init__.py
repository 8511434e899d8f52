"""jaxreshard: convert checkpoints between parallel layouts through JAX meshes.

Public API (everything else is internal and may change):
"""

from .api import ConvertReport as ConvertReport
from .api import convert as convert
from .api import plan_conversion as plan_conversion
from .api import save_strategy as save_strategy
from .errors import ConfigError as ConfigError
from .errors import FormatError as FormatError
from .errors import JaxreshardError as JaxreshardError
from .errors import LayoutError as LayoutError
from .errors import OutputError as OutputError
from .errors import OutputExistsError as OutputExistsError
from .errors import PlanError as PlanError
from .layout import Layout as Layout
from .layout import ParamLayout as ParamLayout
from .layout import layout_from_mesh as layout_from_mesh
from .layout import read_layout as read_layout
from .load import layout_from_strategy as layout_from_strategy
from .load import layout_from_yaml as layout_from_yaml
from .load import load as load
from .load import shardings_from_strategy as shardings_from_strategy
from .load import shardings_from_yaml as shardings_from_yaml
from .lora import merge_lora as merge_lora
from .mindformers.auto import auto_convert as auto_convert
from .mindformers.auto import auto_convert_from_config as auto_convert_from_config
from .plan import Plan as Plan
from .plan import make_plan as make_plan
from .unify import unify as unify
from .verify import VerifyError as VerifyError
from .verify import VerifyReport as VerifyReport
from .verify import verify as verify
