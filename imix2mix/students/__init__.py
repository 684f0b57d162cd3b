"""Students: the multi-view model fine-tuned per scene.  :class:`SevaStudent` is SEVA, fully fine-tuned."""

from imix2mix.students.base import Student
from imix2mix.students.seva import SevaStudent

__all__ = ["SevaStudent", "Student"]
