"""What :mod:`nice_kit.metrics.sandbox` runs to see that an isolation mode works here: a marker,
the uid the code ran as, and what the bootstrap set up (``__nice_sandbox__``, JSON)."""

import json
import os

if __name__ == "__main__":
    print("nice-sandbox-ok", os.getuid(), json.dumps(globals()["__nice_sandbox__"]))
