#!/usr/bin/env python
"""Fine-tune a diffusers video transformer (flow matching) with SSTA sparse attention.

Runs with one process (``python scripts/finetune.py ...``) or many
(``accelerate launch scripts/finetune.py ...``). With no ``--model`` it trains a tiny random
HunyuanVideo-1.5 on a synthetic latent dataset, on the CPU, in seconds::

    python scripts/finetune.py --max-train-steps 3 --output-dir /tmp/ft

A real run (latents from scripts/make_latent_dataset.py)::

    accelerate launch scripts/finetune.py --model /models/HunyuanVideo-1.5-480p_t2v \\
        --data /data/latents --mixed-precision bf16 --gradient-checkpointing \\
        --topk 32 --dense-warmup-steps 100 --sparsity-ramp-steps 400 --max-train-steps 2000 \\
        --learning-rate 1e-5 --checkpointing-steps 250 --output-dir runs/ssta-ft

Add ``--lora-rank 64`` for LoRA, ``--resume-from-checkpoint latest`` to continue a run.
"""


from video_sparse_attn.training.args import parse_args
from video_sparse_attn.training.trainer import train


def main(argv=None) -> None:
    result = train(parse_args(argv))
    last = f"{result['losses'][-1]:.5f}" if result["losses"] else "n/a"
    print(f"finished at step {result['global_step']}, last loss {last}; weights in {result['final_dir']}")


if __name__ == "__main__":
    main()
