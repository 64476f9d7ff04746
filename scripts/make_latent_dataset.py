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

import argparse
import json
import os

import torch

from video_sparse_attn.families import family_of_pipeline
from video_sparse_attn.training.data import make_synthetic_dataset, write_metadata, write_sample
from video_sparse_attn.training.encode import (VIDEO_EXTENSIONS, encode_latents, encode_prompt, load_frames,
                                               preprocess_frames)


def _clips(folder: str, captions_file: str = None):
    captions = {}
    if captions_file:
        with open(captions_file) as f:
            captions = json.load(f)
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
            raise ValueError(f"no caption for {path!r}: add {txt} or an entry in --captions")
        yield path, caption


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--model", help="local diffusers pipeline folder (HunyuanVideo-1.5, HunyuanVideo or Wan)")
    p.add_argument("--videos", help="folder of videos / frame folders with captions")
    p.add_argument("--captions", help="JSON file: name -> caption")
    p.add_argument("--num-frames", type=int, default=61, help="frames per clip (4k+1)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=848)
    p.add_argument("--sample-posterior", action="store_true", help="sample the VAE posterior (default: mode)")
    p.add_argument("--vae-tiling", action="store_true", help="encode in tiles (less memory for long clips)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--synthetic", type=int, default=0, help="write N synthetic samples for the tiny model")
    args = p.parse_args(argv)

    if args.synthetic:
        from video_sparse_attn.training.models import latent_channels, text_dims, tiny_transformer

        tiny = tiny_transformer()
        make_synthetic_dataset(args.output, args.synthetic, (latent_channels(tiny), 2, 8, 8),
                               **{k: v for k, v in text_dims(tiny).items() if k != "pooled_dim"})
        print(f"wrote {args.synthetic} synthetic samples to {args.output}")
        return
    if not (args.model and args.videos):
        p.error("--model and --videos are required (or --synthetic N)")
    if (args.num_frames - 1) % 4:
        p.error(f"--num-frames must be 4k+1 for the causal video VAEs, got {args.num_frames}")

    import diffusers

    with open(os.path.join(args.model, "model_index.json")) as f:
        cls_name = json.load(f)["_class_name"]
    family = family_of_pipeline(cls_name).name   # UnsupportedModelError naming the supported families otherwise
    dtype = getattr(torch, args.dtype)
    pipe = getattr(diffusers, cls_name).from_pretrained(args.model, transformer=None, torch_dtype=dtype)
    pipe.to(args.device)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    gen = torch.Generator(args.device).manual_seed(0)
    shape, count = None, 0
    for path, caption in _clips(args.videos, args.captions):
        pixels = preprocess_frames(load_frames(path), args.num_frames, args.height, args.width)
        sample = {"latents": encode_latents(pipe.vae, pixels, family, args.sample_posterior, gen)}
        sample.update(encode_prompt(pipe, family, caption, torch.device(args.device)))
        write_sample(args.output, count, sample, {"caption": caption, "source": os.path.basename(path)})
        shape = shape or tuple(sample["latents"].shape)
        count += 1
        print(f"[{count}] {path}: latents {tuple(sample['latents'].shape)}")
    if not count:
        raise ValueError(f"no videos found in {args.videos!r} ({VIDEO_EXTENSIONS} or frame folders)")
    text_keys = [k for k in ("prompt_embeds", "prompt_embeds_2", "pooled_prompt_embeds") if k in sample]
    write_metadata(args.output, family, count, shape, text_keys, model=os.path.abspath(args.model),
                   num_frames=args.num_frames, height=args.height, width=args.width)
    print(f"wrote {count} samples to {args.output}")


if __name__ == "__main__":
    main()
