"""jaxreshard: convert checkpoints between parallel layouts through JAX meshes.

Public API (everything else is internal and may change):
"""

from .api import ConvertReport as ConvertReport
from .api import convert as convert
from .api import plan_conversion as plan_conversion
from .errors import ConfigError as ConfigError
from .errors import FormatError as FormatError
from .errors import JaxreshardError as JaxreshardError
from .errors import LayoutError as LayoutError
from .errors import OutputExistsError as OutputExistsError
from .errors import PlanError as PlanError
from .layout import Layout as Layout
from .layout import ParamLayout as ParamLayout
from .layout import layout_from_mesh as layout_from_mesh
from .layout import read_layout as read_layout
from .plan import Plan as Plan
from .plan import make_plan as make_plan
