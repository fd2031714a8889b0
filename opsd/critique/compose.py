"""Flags of the critic for eval and demo, until their flags are generated from `CriticConfig`.

`build_critic` here maps those flags onto a `CriticConfig` (it builds no critic: the one
`build_critic(CriticConfig)` is `opsd.critique.run.build_critic`), and `critique_fn` is
`opsd.critique.run.critique_fn`. This module goes when the lead swaps the flags.
"""
from __future__ import annotations

from opsd.critique.config import CRITIC_NAMES, CriticConfig
from opsd.critique.run import critique_fn  # noqa: F401  (the callers import it from here)


def add_critic_arguments(p, *, default: str = "schema+reference") -> None:
    """Critic options for commands that critique as one of their stages (eval, demo)."""
    g = p.add_argument_group("critic")
    g.add_argument("--critic", choices=CRITIC_NAMES, default=default, help="critic (default: %(default)s)")
    g.add_argument("--base-url", default=None, help="llm critic: OpenAI-compatible endpoint")
    g.add_argument("--critic-model", default=None, help="llm critic: model name on that endpoint")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="llm critic: env var holding the API key")
    g.add_argument("--prompt", default=None, metavar="FILE", help="llm critic: custom Jinja2 prompt template")
    g.add_argument("--critic-concurrency", type=int, default=8, help="critiques in flight (llm critic)")
    g.add_argument("--critic-timeout", type=float, default=60.0, help="llm critic: seconds per request")


def critic_config_from_args(args) -> CriticConfig:
    """The `CriticConfig` of the flags above; raises ValueError naming the field."""
    if args.critic in ("llm", "schema+llm") and not args.base_url:
        raise ValueError(f"--critic {args.critic} needs --base-url (and --critic-model)")
    kw = {"base_url": args.base_url} if args.base_url else {}
    return CriticConfig(name=args.critic, model=args.critic_model or "", api_key_env=args.api_key_env,
                        prompt=args.prompt, timeout=args.critic_timeout, concurrency=args.critic_concurrency, **kw)


build_critic = critic_config_from_args  # the name eval/demo call today; it returns the config critique_fn takes
