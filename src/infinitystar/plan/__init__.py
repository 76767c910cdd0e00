"""Memory and time plans of a generation, computed by running the real code on the meta device (`infinitystar
plan`). See `simulate` for how, `run` for the stages, `models` for what can be planned, docs/gpu.md for results."""
from infinitystar.plan.models import NAMES, Target, folder_target, named_targets, resolve
from infinitystar.plan.report import render, to_json
from infinitystar.plan.run import LADDER, PlanResult, compare_options, plan, predict_times
from infinitystar.plan.simulate import PlanError, Simulator, StageStats, register_module

__all__ = ["NAMES", "Target", "folder_target", "named_targets", "resolve", "render", "to_json", "LADDER", "PlanResult",
           "compare_options", "plan", "predict_times", "PlanError", "Simulator", "StageStats", "register_module"]
