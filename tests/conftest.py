"""Every test (and every CLI it runs) uses a layout cache of its own session, never the user's."""

import os
import tempfile

os.environ["LAYERSCOPE_CACHE_DIR"] = tempfile.mkdtemp(prefix="layerscope-test-cache-")
