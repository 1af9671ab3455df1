"""Public path of the functional core of guided dropout (Eqns 3-4): the very module
:mod:`exdrop.engine.functional`, under the name users import it by."""
import sys

from exdrop.engine import functional as _functional

sys.modules[__name__] = _functional
