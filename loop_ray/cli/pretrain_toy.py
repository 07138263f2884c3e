"""`loop-ray pretrain-toy`: pre-train the embedded world's text-to-image model (loop_ray.toy.pretrain)."""

from __future__ import annotations

import argparse
import dataclasses

from loop_ray.toy.pretrain import PretrainSettings, train


def parse_args(argv: list[str] | None) -> PretrainSettings:
    d = PretrainSettings()
    p = argparse.ArgumentParser(prog="loop-ray pretrain-toy", description="pre-train the embedded world's model "
                                "on rendered scenes (DDPM loss, Min-SNR weights, EMA)")
    p.add_argument("--out", default=d.out, help="output model folder (default: the committed one)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--ema", type=float, default=d.ema, help="EMA decay")
    p.add_argument("--cfg-dropout", type=float, default=d.cfg_dropout, help="share of empty prompts")
    p.add_argument("--min-snr", type=float, default=d.min_snr, help="Min-SNR gamma")
    p.add_argument("--one-object-share", type=float, default=d.one_object_share,
                   help="share of one-object prompts; the two two-object forms split the rest equally")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads")
    p.add_argument("--device", default=d.device, help="torch device to train on (data are rendered on the CPU)")
    p.add_argument("--tiny", action="store_true", help="a tiny 16x16 model (tests)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the spec's)")
    p.add_argument("--channels", default=None, help="UNet block channels, comma-separated, e.g. 16,32,32")
    p.add_argument("--norm-groups", type=int, default=None, help="GroupNorm groups (must divide every channel count)")
    p.add_argument("--no-progress", action="store_true")
    settings = PretrainSettings(**{f.name: getattr(p.parse_args(argv), f.name) for f in dataclasses.fields(d)})
    try:
        settings.check()
    except ValueError as err:
        p.error(str(err))
    return settings


def main(argv: list[str] | None = None) -> int:
    from loop_ray.utils import output_folder

    settings = parse_args(argv)
    output_folder(settings.out)  # fails now rather than after the training
    log = train(settings)
    print(
        f"saved {settings.out}: {log['unet_parameters'] + log['text_encoder_parameters']:,} parameters, "
        f"loss {log['loss_first_50']:.4f} -> {log['loss_last_50']:.4f}, "
        f"{log['wall_seconds']:.0f} s on {log['torch_threads']} thread(s)"
    )
    return 0
