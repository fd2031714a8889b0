"""`opsd critique`: locate the erroneous step of each trajectory and write a hint (resumable).

    opsd critique --in data/sample_openai.jsonl --out runs/critiques.jsonl --critic schema
    opsd critique --in rollouts.jsonl --out critiques.jsonl --critic schema+reference
    OPENAI_API_KEY=... opsd critique --in logs.jsonl --out critiques.jsonl --critic llm \
        --base-url http://localhost:8000/v1 --model my-model --concurrency 16 --timeout 60

Output lines are `Critique.to_dict()` plus `"key": "<trajectory hash>:<critic config hash>"`,
appended and fsynced one by one; rerunning the same command skips what is done, so after a
kill every trajectory ends up exactly once. Exit codes: 0 done (failed critiques are recorded,
not fatal), 1 bad input or a fatal critic error (bad key/model/URL), 2 bad options/prompt.
This is the one module that composes `opsd` and `critic`.
"""
from __future__ import annotations

import argparse
import sys

from opsd.io.trajectories import TrajectoryError, load_trajectories


def add_arguments(p: argparse.ArgumentParser) -> None:
    from critic import CRITICS, DEFAULT_MAX_HINT_TOKENS

    p.add_argument("--in", dest="inputs", nargs="+", required=True, metavar="LOGS",
                   help="JSONL trajectory logs (openai, bare message list or ShareGPT)")
    p.add_argument("--out", required=True, metavar="CRITIQUES.jsonl", help="append-only output (resumable)")
    p.add_argument("--critic", choices=CRITICS, default="schema", help="which critic (default: schema)")
    p.add_argument("--max-hint-tokens", type=int, default=DEFAULT_MAX_HINT_TOKENS,
                   help=f"hint length limit, approximate tokens (default {DEFAULT_MAX_HINT_TOKENS})")
    p.add_argument("--concurrency", type=int, default=8, help="critiques in flight at once (default 8)")
    p.add_argument("--limit", type=int, default=None, help="only the first N trajectories")
    p.add_argument("--rejects", default=None, help="write invalid input lines here and continue")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("llm critic")
    g.add_argument("--base-url", default="https://api.openai.com/v1", help="OpenAI-compatible endpoint")
    g.add_argument("--model", default=None, help="model name (required for --critic llm)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY)")
    g.add_argument("--prompt", default=None, metavar="FILE",
                   help="custom Jinja2 prompt (default prompts/critic/locate_error.j2)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    g.add_argument("--max-attempts", type=int, default=5, help="transport attempts per request (default 5)")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds (default 1)")
    g.add_argument("--max-wait", type=float, default=30.0, help="cap on one retry wait (default 30)")
    g.add_argument("--max-reasks", type=int, default=2, help="re-asks of an invalid reply (default 2)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--max-tokens", type=int, default=512, help="completion budget per reply (default 512)")
    g.add_argument("--no-structured", action="store_true", help="do not send response_format")


def build_critic(args):
    """The critic for the parsed options; raises ValueError/PromptError/CriticFatalError."""
    from critic import make_critic

    llm_config = None
    if args.critic == "llm":
        from critic.llm import LLMConfig

        llm_config = LLMConfig(base_url=args.base_url, model=args.model or "", api_key_env=args.api_key_env,
                               prompt=args.prompt, timeout=args.timeout, max_attempts=args.max_attempts,
                               backoff=args.backoff, max_wait=args.max_wait, max_reasks=args.max_reasks,
                               temperature=args.temperature, max_tokens=args.max_tokens,
                               structured=not args.no_structured, max_hint_tokens=args.max_hint_tokens)
    return make_critic(args.critic, max_hint_tokens=args.max_hint_tokens, llm_config=llm_config)


def run(args) -> int:
    from critic import CriticFatalError
    from critic.runner import format_summary, run_critiques

    try:
        critic = build_critic(args)
    except CriticFatalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # includes PromptError
        print(f"error: {e}", file=sys.stderr)
        return 2
    rejects = open(args.rejects, "w", encoding="utf-8") if args.rejects else None
    try:
        trajectories = load_trajectories(args.inputs, rejects=rejects)
    except (TrajectoryError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if rejects:
            rejects.close()
    if args.limit is not None:
        trajectories = trajectories[:args.limit]
    try:
        summary = run_critiques(trajectories, critic, args.out, concurrency=args.concurrency,
                                progress=not args.no_progress)
    except CriticFatalError as e:
        print(f"error: {e}\nnothing was recorded for the remaining trajectories; fix it and rerun to resume",
              file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0
