#!/usr/bin/env python
"""Encode a folder of videos + captions into the latent dataset format (see
video_sparse_attn/training/data.py) with a local diffusers pipeline's VAE and text encoders.

Input folder: video files (.mp4, .mov, .webm, ...; reading them needs imageio + imageio-ffmpeg) or
sub-folders of frame images, each with a caption in ``<name>.txt`` beside it (or ``--captions
captions.json`` mapping file or folder name → caption)::

    python scripts/make_latent_dataset.py --model /models/HunyuanVideo-1.5-480p_t2v \\
        --videos /data/clips --output /data/latents --num-frames 61 --height 480 --width 848

Without real models, write a synthetic dataset for a tiny transformer instead::

    python scripts/make_latent_dataset.py --synthetic 8 --output /tmp/latents
"""

import os
import shutil
import sys


import torch

from video_sparse_attn.cli import (OneLineParser, UsageError, existing_dir, existing_file,
                                   non_negative_int, positive_int, read_json, run_main)
from video_sparse_attn.families import UnsupportedModelError, family_of_pipeline
from video_sparse_attn.training.data import make_synthetic_dataset, write_metadata, write_sample
from video_sparse_attn.training.encode import (VIDEO_EXTENSIONS, encode_latents, encode_prompt,
                                               load_frames, preprocess_frames)



def _clips(folder: str, captions_file: str = None):
    """[(path, caption)] of every clip, checked up front (a missing caption → UsageError)."""
    captions = read_json(captions_file, "--captions") if captions_file else {}
    clips = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        stem, ext = os.path.splitext(name)
        if not (os.path.isdir(path) or ext.lower() in VIDEO_EXTENSIONS):
            continue
        caption = captions.get(name, captions.get(stem))
        txt = os.path.join(folder, stem + ".txt")
        if caption is None and os.path.isfile(txt):
            with open(txt) as f:
                caption = f.read().strip()
        if caption is None:
            raise UsageError(f"no caption for {path!r}: add {txt} or an entry in --captions")
        clips.append((path, caption))
    if not clips:
        raise UsageError(f"--videos {folder!r}: no videos ({', '.join(VIDEO_EXTENSIONS)}) or frame folders found")
    return clips


def build_parser() -> OneLineParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="dataset folder to write (metadata.json + samples/)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    p.add_argument("--model", type=existing_dir,
                   help="local diffusers pipeline folder (HunyuanVideo-1.5, HunyuanVideo or Wan)")
    p.add_argument("--videos", type=existing_dir, help="folder of videos / frame folders with captions")
    p.add_argument("--captions", type=existing_file, help="JSON file: name -> caption")
    p.add_argument("--num-frames", type=positive_int, default=61, help="frames per clip (4k+1)")
    p.add_argument("--height", type=positive_int, default=480, help="pixels, a multiple of 16")
    p.add_argument("--width", type=positive_int, default=848, help="pixels, a multiple of 16")
    p.add_argument("--sample-posterior", action="store_true", help="sample the VAE posterior (default: mode)")
    p.add_argument("--vae-tiling", action="store_true", help="encode in tiles (less memory for long clips)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="VAE and text encoder precision")
    p.add_argument("--synthetic", type=non_negative_int, default=0,
                   help="write N synthetic samples for the tiny model instead")
    return p


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if os.path.exists(os.path.join(args.output, "metadata.json")) or os.path.isdir(os.path.join(args.output, "samples")):
        if not args.overwrite:
            raise UsageError(f"--output {args.output!r} already holds a dataset; pass --overwrite to replace it "
                             "or choose another folder")
        shutil.rmtree(os.path.join(args.output, "samples"), ignore_errors=True)
    if args.synthetic:
        from video_sparse_attn.training.models import latent_channels, text_dims, tiny_transformer

        tiny = tiny_transformer()
        make_synthetic_dataset(args.output, args.synthetic, (latent_channels(tiny), 2, 8, 8),
                               **{k: v for k, v in text_dims(tiny).items() if k != "pooled_dim"})
        print(f"wrote {args.synthetic} synthetic samples to {args.output}")
        return
    if not (args.model and args.videos):
        raise UsageError("--model and --videos are required (or --synthetic N)")
    if (args.num_frames - 1) % 4:
        raise UsageError(f"--num-frames {args.num_frames}: must be 4k+1 (e.g. 33, 61, 121) for the causal video VAEs")
    for name in ("height", "width"):
        if getattr(args, name) % 16:
            raise UsageError(f"--{name} {getattr(args, name)}: must be a multiple of 16")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r}: not a torch device (e.g. cpu, cuda)") from None
    index = os.path.join(args.model, "model_index.json")
    if not os.path.isfile(index):
        raise UsageError(f"--model {args.model!r}: no model_index.json; expected a local diffusers pipeline folder")
    cls_name = read_json(index, "--model").get("_class_name")
    try:
        family = family_of_pipeline(str(cls_name)).name
    except UnsupportedModelError as e:
        raise UsageError(f"--model {args.model!r}: {e}") from None
    clips = _clips(args.videos, args.captions)

    import diffusers

    dtype = getattr(torch, args.dtype)
    pipe = getattr(diffusers, cls_name).from_pretrained(args.model, transformer=None, torch_dtype=dtype)
    pipe.to(device)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    gen = torch.Generator(device).manual_seed(0)
    shape, count = None, 0
    for path, caption in clips:
        pixels = preprocess_frames(load_frames(path), args.num_frames, args.height, args.width)
        sample = {"latents": encode_latents(pipe.vae, pixels, family, args.sample_posterior, gen)}
        sample.update(encode_prompt(pipe, family, caption, device))
        write_sample(args.output, count, sample, {"caption": caption, "source": os.path.basename(path)})
        shape = shape or tuple(sample["latents"].shape)
        count += 1
        print(f"[{count}] {path}: latents {tuple(sample['latents'].shape)}")
    text_keys = [k for k in ("prompt_embeds", "prompt_embeds_2", "pooled_prompt_embeds") if k in sample]
    write_metadata(args.output, family, count, shape, text_keys, model=os.path.abspath(args.model),
                   num_frames=args.num_frames, height=args.height, width=args.width)
    print(f"wrote {count} samples to {args.output}")


if __name__ == "__main__":
    sys.exit(run_main(main, prog="make_latent_dataset.py"))
