"""`hf-uwm push-metric`: publish the SafeGround metric as a Space."""

from __future__ import annotations


def register(commands):
    metric = commands.add_parser("push-metric", help="publish the SafeGround metric as a Space for evaluate.load")
    metric.add_argument("repo_id", metavar="NAMESPACE/safeground")
    metric.add_argument("--private", action="store_true")
    metric.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")
    metric.set_defaults(run=run, quiet=True)


def run(args):
    from ..hub import push_metric

    info = push_metric(args.repo_id, private=args.private or None, token=args.token)
    print(f"pushed the SafeGround metric to the Space {args.repo_id}: evaluate.load({args.repo_id!r})\n{info}")
