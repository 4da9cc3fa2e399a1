"""Every family ComfyUI runs, through the host's own route: one :class:`Teacher` (teacher.py), one
table of the facts the host's API cannot express (table.py), the LoRA target sets (targets.py)."""
from .table import REFUSED, ROWS, Row, row_for  # noqa: F401
from .teacher import Teacher, TeacherError, family_problem, host_training, model_fingerprint  # noqa: F401
