"""Named pause points for crash tests (`kill -9` in the middle of the apply step).

Inert unless CAPTI_FAILPOINT names the point: then the process writes its pid to
CAPTI_FAILPOINT_MARKER and sleeps, so a test can kill it at exactly that moment.
"""

import os
import time
from pathlib import Path


def failpoint(name: str) -> None:
    if os.environ.get("CAPTI_FAILPOINT") != name:
        return
    marker = os.environ.get("CAPTI_FAILPOINT_MARKER")
    if marker:
        Path(marker).write_text(str(os.getpid()), encoding="utf-8")
    time.sleep(float(os.environ.get("CAPTI_FAILPOINT_SLEEP_S", "120")))
