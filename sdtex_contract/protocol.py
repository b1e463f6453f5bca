"""The one protocol between the Blender add-on and the backend worker, in one namespace (see docs/protocol.md):

- wire.py: the version, methods, events, job states and the JSON-lines framing;
- errors.py: error codes and ProtocolError;
- params.py: Param, the kinds, ranges and limits;
- tables.py: the parameter groups; tasks.py: each task's spec; typed.py: its parameter class (generated);
- validation.py: checking a request's params against its task's table;
- results.py: events and results.
"""

from .errors import *  # noqa: F403
from .params import *  # noqa: F403
from .results import *  # noqa: F403
from .tables import *  # noqa: F403
from .tasks import *  # noqa: F403
from .typed import *  # noqa: F403
from .validation import *  # noqa: F403
from .wire import *  # noqa: F403
