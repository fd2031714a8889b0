"""`python -m opsd.train ...` / `accelerate launch -m opsd.train ...`: the same as `opsd train ...`
(the CLI composes the critic reward for GKD+RL; `opsd.train.run.main(cfg, reward_fn=...)` is the library API)."""
import sys

from opsd.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
