"""The LightningModules: glue that says which network is trained on what."""
from .base import DistillModule, NonFiniteLossError
from .disback import BacktrackingSchedule, DisBackStudent
from .checkpoints import load_source, model_from_checkpoint
from .nodistill import NoDistillOneStep
from .one_step import OneStepModule
from .opd import OPDStudent
from .pretrain import DiffusionPretrain
from .teacher_rl import TeacherRL

__all__ = ["DistillModule", "NonFiniteLossError", "DiffusionPretrain", "TeacherRL", "OPDStudent",
           "OneStepModule", "DisBackStudent", "BacktrackingSchedule", "NoDistillOneStep", "load_source", "model_from_checkpoint"]
