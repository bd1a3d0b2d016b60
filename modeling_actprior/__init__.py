"""actprior: action priors for cross-embodiment robot learning, native to the Hugging Face stack.

Importing this package registers the ``actprior`` model type with ``AutoConfig`` / ``AutoModel``, so
``AutoModel.from_pretrained(path)`` works without ``trust_remote_code``. Saved checkpoints also carry
their code files and an ``auto_map``, so a Python *without* this package can load them with
``trust_remote_code=True`` (which runs those files: read them first if the checkpoint is not yours).
"""

from transformers import AutoConfig, AutoModel

from .action_space import (
    EMBODIMENT_REGISTRY,
    ActionNormalizer,
    EmbodimentSpec,
    EmbodimentStats,
    UnknownEmbodimentError,
    get_embodiment,
    pad_actions,
    register_embodiment,
)
from .configuration_actprior import ACTPRIOR_PRESETS, ActionPriorConfig
from .modeling_actprior import ActionPriorLatent, ActionPriorModel, ActionPriorOutput
from .scheduling_flow_matching import FlowMatchingActionScheduler, FlowMatchingSchedulerOutput

__version__ = "0.1.0"

AutoConfig.register(ActionPriorConfig.model_type, ActionPriorConfig, exist_ok=True)
AutoModel.register(ActionPriorConfig, ActionPriorModel, exist_ok=True)
# Every save_pretrained writes an auto_map and copies the code files beside the weights.
ActionPriorConfig.register_for_auto_class()
ActionPriorModel.register_for_auto_class("AutoModel")

__all__ = [
    "ACTPRIOR_PRESETS",
    "EMBODIMENT_REGISTRY",
    "ActionNormalizer",
    "ActionPriorConfig",
    "ActionPriorLatent",
    "ActionPriorModel",
    "ActionPriorOutput",
    "EmbodimentSpec",
    "EmbodimentStats",
    "FlowMatchingActionScheduler",
    "FlowMatchingSchedulerOutput",
    "UnknownEmbodimentError",
    "get_embodiment",
    "pad_actions",
    "register_embodiment",
]

# Stage 2: the VLA with an action prior, and its processor.
from transformers import AutoProcessor  # noqa: E402

from .configuration_actprior_vla import VLA_BASELINES, VLA_PRESETS, VLAWithPriorConfig  # noqa: E402
from .modeling_actprior_vla import VLAWithPriorForAction, VLAWithPriorOutput  # noqa: E402
from .processing_actprior import ActionPriorProcessor, build_instruction_tokenizer  # noqa: E402

AutoConfig.register(VLAWithPriorConfig.model_type, VLAWithPriorConfig, exist_ok=True)
AutoModel.register(VLAWithPriorConfig, VLAWithPriorForAction, exist_ok=True)
AutoProcessor.register(VLAWithPriorConfig, ActionPriorProcessor, exist_ok=True)
VLAWithPriorConfig.register_for_auto_class()
VLAWithPriorForAction.register_for_auto_class("AutoModel")
ActionPriorProcessor.register_for_auto_class("AutoProcessor")
__all__ += ["VLA_BASELINES", "VLA_PRESETS", "ActionPriorProcessor", "VLAWithPriorConfig", "VLAWithPriorForAction",
            "VLAWithPriorOutput", "build_instruction_tokenizer"]

# The "robot-action" pipeline task: pipeline("robot-action", model=PATH) (the processor loads via AutoProcessor).
from transformers.pipelines import PIPELINE_REGISTRY  # noqa: E402

from pipelines.robot_action import TASK as ROBOT_ACTION_TASK  # noqa: E402
from pipelines.robot_action import RobotActionPipeline  # noqa: E402

PIPELINE_REGISTRY.register_pipeline(ROBOT_ACTION_TASK, pipeline_class=RobotActionPipeline, pt_model=AutoModel,
                                    type="multimodal")
__all__ += ["RobotActionPipeline"]
