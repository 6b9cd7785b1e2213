"""The LightningModules: glue that says which network is trained on what."""
from .base import DistillModule, NonFiniteLossError
from .pretrain import DiffusionPretrain
from .opd import OPDStudent
from .teacher_rl import TeacherRL

__all__ = ["DistillModule", "NonFiniteLossError", "DiffusionPretrain", "TeacherRL", "OPDStudent"]
