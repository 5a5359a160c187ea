"""`titanserve make-model` and `titanserve keygen`."""

from __future__ import annotations

import argparse

from titanserve.launcher.cli import UsageError

_MOE_ONLY = ("experts", "top_k", "noise")


def make_model(args: argparse.Namespace) -> int:
    """Build the checkpoint folder `args.out` of `args.family` and print its path."""
    family = args.family
    if family != "smollm2-moe":
        given = [f"--{n.replace('_', '-')}" for n in _MOE_ONLY if getattr(args, n) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only applies to smollm2-moe")
    if family.startswith("tiny-"):
        if args.dtype not in (None, "float32"):
            raise UsageError("tiny models are written in float32; pick --dtype when serving")
        from titanserve.launcher.tiny_models import make_tiny

        out = make_tiny(family, args.out, seed=args.seed)
    elif family == "smollm2":
        from titanserve.launcher.smollm2_models import make_smollm2

        out = make_smollm2(args.out, dtype=args.dtype or "bfloat16")
    else:
        from titanserve.launcher.smollm2_models import make_smollm2_moe

        out = make_smollm2_moe(
            args.out,
            experts=args.experts if args.experts is not None else 8,
            top_k=args.top_k if args.top_k is not None else 2,
            noise=args.noise if args.noise is not None else 0.0,
            seed=args.seed,
            dtype=args.dtype or "bfloat16",
        )
    print(out)
    return 0


def keygen(args: argparse.Namespace) -> int:
    """Write a CurveZMQ key pair to `args.out` and print both paths."""
    from titanserve.launcher.keys import write_keypair

    public_path, secret_path = write_keypair(args.out, args.name, overwrite=args.force)
    print(f"public key: {public_path}")
    print(f"secret key: {secret_path} (mode 600; keep it private)")
    return 0
