"""``zsq proxy rank``: ZeroP's ranking of candidate proxy data sets by BatchNorm-statistics distance.

Plugged into :mod:`zsq.cli` through ``PLUGIN_MODULES`` (``"zsq.proxy.commands"``): :func:`add_commands`
adds the ``proxy`` sub-parser (with its action ``rank``) and returns ``{"proxy": handler}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from ..cli_types import MODEL_HELP, HandlerMap, pos_int as _pos_int
from ..errors import ConfigError
from .candidates import ACCEPTED_FORMS


def add_commands(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> HandlerMap:
    """Add ``proxy`` (action ``rank``) to the ``zsq`` sub-command parser ``sub``."""
    from .select import DEFAULT_BATCH, NORMALIZATIONS

    p = sub.add_parser(
        "proxy", help="ZeroP: rank candidate proxy data sets by BatchNorm-statistics distance",
        description="Proxy calibration data (ZeroP): feed a sample of each candidate through the model and "
                    "measure how far the batch statistics of every BatchNorm input are from the running "
                    "(training) statistics; the closest candidate is the best proxy. Calibrate on it with "
                    "`zsq quantize MODEL --calib proxy:A,B,C` (or proxy+distilled:A,B,C).")
    actions = p.add_subparsers(dest="proxy_action", metavar="ACTION")
    r = actions.add_parser(
        "rank", help="print the BN distance of each candidate, best first",
        description=f"Candidates: {ACCEPTED_FORMS}. Images of any resolution go through the model's own "
                    "preprocessing (resized so the shorter side fits, then centre-cropped).",
        epilog="Example: zsq proxy rank cifar_resnet20 --weights resnet20.th --candidates ../imagenet-sample "
               "procedural:textures procedural:blobs gaussian --json ranking.json")
    r.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    r.add_argument("--weights", metavar="PATH", help="weights file (state_dict .pt/.pth/.th or .safetensors)")
    r.add_argument("--candidates", nargs="+", required=True, metavar="CANDIDATE",
                   help="candidate data sets: PATH, procedural:textures, procedural:blobs, procedural:deadleaves, "
                        "gaussian, uniform, skimage")
    r.add_argument("--num-images", type=_pos_int, default=64, help="images sampled from each candidate (default 64)")
    r.add_argument("--batch-size", type=_pos_int, default=DEFAULT_BATCH,
                   help=f"forward batch size (default {DEFAULT_BATCH}; the distance does not depend on it)")
    r.add_argument("--normalization", choices=NORMALIZATIONS, default="layer",
                   help="per-layer normalisation of the distance (default layer; see docs/proxy.md)")
    r.add_argument("--json", metavar="FILE", default=None,
                   help='write the ranking as a JSON list of {"candidate": ..., "distance": ...}, best first')
    add_common(r)
    return {"proxy": cmd_proxy}


def cmd_proxy(args: argparse.Namespace) -> int:
    if getattr(args, "proxy_action", None) != "rank":
        raise ConfigError("choose an action: `zsq proxy rank MODEL --candidates A B C ...`")
    return cmd_rank(args)


def cmd_rank(args: argparse.Namespace) -> int:
    from ..models import load_model
    from ..pipeline import check_device
    from .candidates import parse_candidates
    from .select import rank_candidates

    parse_candidates(args.candidates)  # fail on a typo before loading the model
    check_device(args.device)
    model, spec = load_model(args.model, weights=args.weights)
    scores = rank_candidates(model, spec.preprocessing, args.candidates, num_images=args.num_images,
                             seed=args.seed, device=args.device, progress=not args.quiet,
                             normalization=args.normalization, batch_size=args.batch_size)
    width = max(len("candidate"), *(len(s.candidate) for s in scores))
    print(f"{'rank':>4}  {'candidate':<{width}}  {'BN distance':>11}  images")
    for i, s in enumerate(scores, start=1):
        print(f"{i:>4}  {s.candidate:<{width}}  {s.distance:>11.4f}  {s.num_images:>6}")
    best = scores[0]
    print(f"best proxy: {best.candidate}; calibrate on it with: zsq quantize {args.model} --calib "
          f"proxy:{','.join(s.candidate for s in scores)}")
    if args.json:
        Path(args.json).write_text(json.dumps([s.to_dict() for s in scores], indent=2))
    return 0
