"""diffusers integration: SSTA attention processors, grid hook, schedules, stats, `enable_ssta`.

Nothing here imports diffusers at import time; the diffusers pieces load on first use. The supported
model families are described in `video_sparse_attn.families`.
"""

from .base import SSTAAttnProcessor, check_backend_support
from .cp_plan import cp_plan_for, enable_ulysses, hunyuan_video15_cp_plan, start_process_group
from .enable import disable_ssta, enable_ssta
from .grid_hook import SSTARuntime, bind_runtime, install_grid_hook, remove_grid_hook, runtime_of
from .schedule import SSTASchedule
from .stats import AttentionRecord, SSTAStats

__all__ = [
    "SSTAAttnProcessor", "enable_ssta", "disable_ssta", "SSTASchedule", "SSTAStats", "SSTARuntime",
    "AttentionRecord", "runtime_of", "install_grid_hook",
    "remove_grid_hook", "bind_runtime", "check_backend_support", "enable_ulysses", "cp_plan_for",
    "hunyuan_video15_cp_plan", "start_process_group",
]
