"""Session-wide test settings.

Triton reads TRITON_INTERPRET when it is first imported (vLLM imports it early), so
the interpreter mode for the Triton kernel tests is set here, before any test module
loads. End-to-end and server tests remove it from their subprocesses' environment.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
