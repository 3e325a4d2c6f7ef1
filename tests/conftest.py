"""Suite-wide setup: Triton kernels run in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before anything imports triton (transformers may), so it is
set here, before any test module is imported.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
