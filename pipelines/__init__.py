"""Transformers pipelines for actprior checkpoints (``robot-action``), registered when ``modeling_actprior`` is imported."""

from .robot_action import TASK, RobotActionPipeline

__all__ = ["TASK", "RobotActionPipeline"]
