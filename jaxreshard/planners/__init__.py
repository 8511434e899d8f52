"""Planners: one seam per layout source (see base.py for the protocol and its call sequence)."""

from .base import ArrayPlanner as ArrayPlanner
from .base import ArrayRequest as ArrayRequest
from .base import FileRequest as FileRequest
from .base import Planner as Planner
from .mindspore import MindSporePlanner as MindSporePlanner
from .native import NativePlanner as NativePlanner
from .restore import RestorePlanner as RestorePlanner
from .sides import Side as Side
from .sides import StrategyPath as StrategyPath
from .sides import is_strategy_path as is_strategy_path
from .sides import one_side as one_side
from .sides import read_side as read_side
