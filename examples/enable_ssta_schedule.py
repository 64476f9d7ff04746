"""`enable_ssta` on a pipeline with a schedule: dense first steps, a dense layer, per-head windows.

The step comes from the pipeline's scheduler (``scheduler.step_index``), so two pipelines in one
process keep separate schedules. Uses the tiny random HunyuanVideo-1.5 pipeline (offline, CPU).
"""

import json
import os
import tempfile

import torch

from video_sparse_attn import SSTAConfig
from video_sparse_attn.processors import SSTASchedule, disable_ssta, enable_ssta
from video_sparse_attn.testing import random_prompt_embeds, tiny_hunyuan_video15_pipeline

pipe = tiny_hunyuan_video15_pipeline()
embeds = random_prompt_embeds(pipe)

config = SSTAConfig(tile_thw=(1, 4, 4), kernel_thw=(1, 3, 3), topk=4, caller_rules=False)
schedule = SSTASchedule(
    dense_steps=2,                               # steps 0 and 1 dense (STA keeps 15 of 50)
    dense_layers=(),
    mask_strategy={
        "*_1_0": [3, 3, 3],                      # layer 1, head 0: a wider window at every step
        "*_*_1": {"topk": 2},                    # head 1 of every layer: fewer selected tiles
    },
)

# schedules (and configs) round-trip through JSON or safetensors metadata
path = os.path.join(tempfile.mkdtemp(), "schedule.json")
schedule.save(path)
assert SSTASchedule.load(path) == schedule
print("schedule:", json.dumps(schedule.to_dict()))

runtime = enable_ssta(pipe, config, schedule, stats=True)
video = pipe(**embeds, height=32, width=32, num_frames=9, num_inference_steps=5, output_type="np",
             generator=torch.Generator().manual_seed(0)).frames[0]
print(f"video {video.shape} (noise: random weights), latent grid {runtime.thw}")
print(runtime.stats.format())
modes = {s: v["sparse_types"] for s, v in runtime.stats.summary()["per_step"].items()}
assert modes[0] == modes[1] == ["dense"] and modes[2] == ["ssta"], modes
for start, stop, cfg in schedule.head_groups(config.for_thw(runtime.thw), step=2, layer=1, num_heads=2):
    print(f"step 2, layer 1, heads {start}..{stop - 1}: window {cfg.kernel_thw}, topk {cfg.topk}")
disable_ssta(pipe)
