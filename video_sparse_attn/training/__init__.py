"""Fine-tuning video transformers under SSTA: latent datasets, flow matching, sparsity ramp, loop.

Imports accelerate, diffusers and peft lazily (only `train` and the model helpers need them).
"""

from .data import LatentVideoDataset, collate_samples, make_synthetic_dataset, write_metadata, write_sample
from .flow_matching import add_noise, flow_matching_loss, sample_sigmas
from .sparsity import SparsityRamp, remove_sparse_attention, set_sparse_attention

__all__ = [
    "LatentVideoDataset", "collate_samples", "make_synthetic_dataset", "write_sample", "write_metadata",
    "sample_sigmas", "add_noise", "flow_matching_loss", "SparsityRamp", "set_sparse_attention",
    "remove_sparse_attention", "train",
]


def train(args):
    """See `video_sparse_attn.training.trainer.train`."""
    from .trainer import train as _train

    return _train(args)
