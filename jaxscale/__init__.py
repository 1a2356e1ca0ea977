"""jaxscale: data-parallel training of Flax models across a device mesh."""
import time as _time

__version__ = "0.1.0"

PROCESS_START = _time.time()  # time-to-target counts from here (the process's first import)
