"""Glue between `opsd` stages and the `critic` package (the CLI layer is the only place that imports both)."""
from __future__ import annotations

from pathlib import Path

from opsd.io.records import read_jsonl
from opsd.types import Critique, Trajectory


def add_critic_arguments(p, *, default: str = "schema+reference") -> None:
    """Critic options for commands that critique as one of their stages (eval, demo, loop)."""
    from critic import CRITICS

    g = p.add_argument_group("critic")
    g.add_argument("--critic", choices=CRITICS, default=default, help="critic (default: %(default)s)")
    g.add_argument("--base-url", default=None, help="llm critic: OpenAI-compatible endpoint")
    g.add_argument("--critic-model", default=None, help="llm critic: model name on that endpoint")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="llm critic: env var holding the API key")
    g.add_argument("--prompt", default=None, metavar="FILE", help="llm critic: custom Jinja2 prompt template")
    g.add_argument("--critic-concurrency", type=int, default=8, help="critiques in flight (llm critic)")
    g.add_argument("--critic-timeout", type=float, default=60.0, help="llm critic: seconds per request")


def build_critic(args):
    from critic import make_critic

    llm = None
    if args.critic == "llm":
        from critic.llm import LLMConfig

        if not args.base_url:
            raise ValueError("--critic llm needs --base-url (and --critic-model)")
        llm = LLMConfig(base_url=args.base_url, model=args.critic_model or "", api_key_env=args.api_key_env,
                        prompt=args.prompt, timeout=args.critic_timeout)
    return make_critic(args.critic, llm_config=llm)


def critique_fn(critic, *, concurrency: int = 8, progress: bool = True):
    """A `CritiqueFn` (trajectories, out_path) -> critiques, resumable through out_path."""
    from critic.runner import format_summary, record_key, run_critiques

    def fn(trajs: list[Trajectory], out_path: Path) -> list[Critique]:
        summary = run_critiques(trajs, critic, out_path, concurrency=concurrency, progress=progress)
        print(format_summary(summary))
        wanted = {record_key(t, critic): t.id for t in trajs}
        return [Critique.from_dict(r) for r in read_jsonl(out_path) if r["key"] in wanted]

    return fn
