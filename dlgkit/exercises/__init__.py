"""Automatic feedback for the exercises: one ``check_*`` function per exercise.

Each check runs the student's function on private cases drawn afresh at every call (the
student's code cannot see them, see ``_common``), compares with the truth or the check's own
computation, prints a pass message or the usual mistake behind a wrong answer, and returns
True/False (it never raises, so a notebook can be run top to bottom). The exercises themselves live in
``exercises/`` (generated from ``solutions/``). The checks are grouped by chapter in
submodules and all re-exported here, so ``from dlgkit import exercises as ex`` is enough.
"""

from dlgkit.exercises._common import ExerciseFailure, call_student, fresh_generator
from dlgkit.exercises.images import *  # noqa: F403
from dlgkit.exercises.images import __all__ as _images_all
from dlgkit.exercises.defences import *  # noqa: F403
from dlgkit.exercises.defences import __all__ as _defences_all
from dlgkit.exercises.text import *  # noqa: F403
from dlgkit.exercises.text import __all__ as _text_all
from dlgkit.exercises.fl import *  # noqa: F403
from dlgkit.exercises.fl import __all__ as _fl_all
from dlgkit.exercises.malicious import *  # noqa: F403
from dlgkit.exercises.malicious import __all__ as _malicious_all

__all__ = ["ExerciseFailure", "call_student", "fresh_generator", *_images_all, *_text_all, *_defences_all, *_fl_all, *_malicious_all]
