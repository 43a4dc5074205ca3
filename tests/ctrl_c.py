"""Children a test will Ctrl-C must take SIGINT even when the test run itself ignores it.

A shell without job control starts background commands (`.ci/run &`, `nohup make test &`) with SIGINT ignored,
children inherit that, and Python then installs no KeyboardInterrupt handler: `rlq top` or `rlq train` would never
see the test's Ctrl-C. Pass `preexec_fn=sigint_default` to the Popen of such a child.
"""

from __future__ import annotations

import signal


def sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
